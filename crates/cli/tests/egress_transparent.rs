//! Egress on the transparent path (SPEC §5 "Not a way around the mesh", issue 16 item 8): an
//! app in a network namespace whose outbound TCP is REDIRECTed to its sidecar, under
//! `outboundTrafficPolicy: registryOnly`. An address listed by an ExternalService is reached
//! (HTTP and opaque TCP); an address:port no registry knows is refused — 502 `destination not
//! in the registry` for HTTP (whatever `Host` says), a close for opaque TCP — and counted.
//!
//! Topology: namespace A (app + sidecar, 10.232.N.1) ── veth ── namespace B (servers,
//! 10.232.N.2, outside the mesh). Needs root, `ip`, `iptables`, `setpriv`, `curl`, `python3`.

use std::process::Command;
use std::time::Duration;

use plexus_testkit::netns::{NetnsPair, sh};
use plexus_testkit::{Proc, Proxy, Shared, TempDir, exclusive, require_root, require_tool};

mod common;

use common::PLEXUS;
use common::egress::{Pki, TLS_ECHO};

fn prerequisites() -> bool {
    require_root()
        && require_tool("ip")
        && require_tool("iptables")
        && require_tool("setpriv")
        && require_tool("curl")
        && require_tool("/usr/bin/python3")
}

/// The status line and `x-plexus-error` of `curl -sS -D -` output.
fn status_and_error(out: &std::process::Output) -> (String, Option<String>) {
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text.lines().next().unwrap_or_default().trim().to_string();
    let error = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-plexus-error").then(|| v.trim().to_string())
    });
    (status, error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_on_the_transparent_path() -> anyhow::Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    // Network namespaces, veth pairs and iptables: not beside the `--netns` demo.
    let _host_network = exclusive(Shared::HostNetwork).await;
    let net = NetnsPair::create("pegr", 232)?;
    let server_ip = net.server_ip();
    let dir = TempDir::new("egress-transparent")?;
    std::fs::write(dir.join("hello.txt"), "hello from outside\n")?;

    // Outside the mesh: HTTP on 8080 (listed) and 8081 (not), TCP echo on 9000 (listed) and 9001.
    let mut servers = Vec::new();
    for port in ["8080", "8081"] {
        servers.push(Proc(
            Command::new("ip")
                .args(net.exec(&net.b, &["python3", "-m", "http.server", port, "--bind", "0.0.0.0"]))
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        ));
    }
    let echo_src = "import socket,sys\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(16)\nwhile True:\n    c,_=s.accept()\n    d=c.recv(100)\n    c.sendall(b'echo:'+d); c.close()\n";
    for port in ["9000", "9001"] {
        servers.push(Proc(Command::new("ip").args(net.exec(&net.b, &["python3", "-c", echo_src, port])).spawn()?));
    }
    // TLS echo servers: 9443 with a certificate for the address from the test CA, 9444 from another.
    let pki = Pki::new(&dir, &[&server_ip]);
    for (port, (cert, key)) in [("9443", &pki.good), ("9444", &pki.foreign)] {
        let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
        let args = ["python3", "-c", TLS_ECHO, &cert, &key, "0.0.0.0", port];
        servers
            .push(Proc(Command::new("ip").args(net.exec(&net.b, &args)).stdout(std::process::Stdio::null()).spawn()?));
    }
    let resources = format!(
        r#"apiVersion: plexus.dev/v1alpha1
kind: MeshConfig
metadata: {{name: default}}
spec: {{outboundTrafficPolicy: registryOnly}}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: partner}}
spec:
  hosts: [{server_ip}]
  ports: [{{port: 8080, protocol: http}}, {{port: 9000, protocol: tcp}}]
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: secure}}
spec:
  hosts: [{server_ip}]
  ports: [{{port: 9443, protocol: tls}}, {{port: 9444, protocol: tls}}]
  tls: {{originate: true, caFile: {ca}}}
"#,
        ca = pki.ca.display()
    );
    let res = dir.join("mesh.yaml");
    std::fs::write(&res, resources)?;
    let res = res.to_string_lossy().to_string();
    // The app (uid 65534) is redirected to its sidecar; the sidecar (root) is not.
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
    let sidecar =
        Proxy::spawn_named("app-sidecar", "ip", net.exec(&net.a, &[PLEXUS, "proxy", "--resources", &res])).await?;
    plexus_testkit::eventually(Duration::from_secs(20), || async {
        let out = Command::new("ip").args(net.exec(&net.b, &["ss", "-Hltn"])).output()?;
        let listening = String::from_utf8_lossy(&out.stdout).into_owned();
        for port in [":8080 ", ":8081 ", ":9000 ", ":9001 ", ":9443 ", ":9444 "] {
            anyhow::ensure!(listening.contains(port), "nothing listens on {port} yet:\n{listening}");
        }
        Ok(())
    })
    .await?;
    let as_app = |cmd: &[&str]| {
        let mut args = vec!["netns", "exec", &net.a, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
        args.extend_from_slice(cmd);
        Command::new("ip").args(args).output()
    };
    let curl = |url: &str, extra: &[&str]| {
        let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-D", "-"];
        cmd.extend_from_slice(extra);
        cmd.push(url);
        as_app(&cmd)
    };

    // Positive control: the listed address and port, by HTTP.
    let out = curl(&format!("http://{server_ip}:8080/hello.txt"), &[])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hello from outside"), "listed HTTP: {text}\n{}", String::from_utf8_lossy(&out.stderr));

    // Refused: another port of the same address, whatever the Host header claims.
    for (what, extra) in [
        ("an unlisted port", vec![]),
        ("a Host naming the listed port", vec!["-H".to_string(), format!("Host: {server_ip}:8080")]),
        ("a Host naming another name", vec!["-H".to_string(), "Host: partner.example".to_string()]),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = curl(&format!("http://{server_ip}:8081/hello.txt"), &extra)?;
        let (status, error) = status_and_error(&out);
        assert!(status.contains(" 502"), "{what}: {status}\n{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(error.as_deref(), Some("destination not in the registry"), "{what}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("hello from outside"), "{what}: served");
    }

    // Opaque TCP: the listed port echoes; the unlisted one is closed unanswered.
    let tcp = "import socket,sys\ns=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); s.sendall(b'ping')\ntry:\n    print('got:' + s.recv(100).decode())\nexcept Exception as e:\n    print('error:' + type(e).__name__)\n";
    let out = as_app(&["/usr/bin/python3", "-c", tcp, &server_ip, "9000"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "got:echo:ping",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_app(&["/usr/bin/python3", "-c", tcp, &server_ip, "9001"])?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(answer == "got:" || answer.starts_with("error:"), "unlisted TCP was answered: {answer}");

    // TLS origination on the transparent path: plaintext from the app leaves over TLS verified
    // against the ExternalService's CA (the address is the name checked); the app's own TLS
    // passes through as sent; a certificate from another CA closes the stream, counted.
    let out = as_app(&["/usr/bin/python3", "-c", tcp, &server_ip, "9443"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "got:tls-echo:ping",
        "plaintext originated: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = std::fs::read_to_string(&pki.ca)?;
    let own_tls = "import socket,ssl,sys\nctx=ssl.create_default_context(cadata=sys.argv[3])\ns=ctx.wrap_socket(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10), server_hostname=sys.argv[1]); s.sendall(b'ping')\nprint('got:' + s.recv(100).decode())\n";
    let out = as_app(&["/usr/bin/python3", "-c", own_tls, &server_ip, "9443", &ca])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "got:tls-echo:ping",
        "the app's own TLS passes through: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_app(&["/usr/bin/python3", "-c", tcp, &server_ip, "9444"])?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(answer == "got:" || answer.starts_with("error:"), "an unverified host was reached: {answer}");

    // Counted per destination; the listed calls carry the ExternalService's name.
    let metrics =
        Command::new("ip").args(net.exec(&net.a, &["curl", "-s", "http://127.0.0.1:7712/metrics"])).output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let count = |label: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("plexus_egress_denied_total{") && l.contains(label))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert!(count(&format!("destination=\"{server_ip}:8081\"")) >= 2.0, "HTTP refusals counted:\n{metrics}");
    assert!(count(&format!("destination=\"{server_ip}:9001\"")) >= 1.0, "TCP refusal counted:\n{metrics}");
    let origination_failed = |port: u16| -> f64 {
        let series = format!("plexus_egress_origination_failed_total{{destination=\"{server_ip}:{port}\"}} ");
        metrics.lines().filter_map(|l| l.strip_prefix(series.as_str())?.parse::<f64>().ok()).sum()
    };
    assert_eq!(origination_failed(9444), 1.0, "the unverified host counted:\n{metrics}");
    assert_eq!(origination_failed(9443), 0.0, "the verified one not:\n{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("plexus_requests_total{direction=\"outbound\"")
            && l.contains("destination_service=\"partner\"")
            && l.contains("response_code=\"200\"")),
        "the listed HTTP call is labelled with the ExternalService:\n{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with("plexus_tcp_connections_opened_total{direction=\"outbound\"")
            && l.contains("destination_service=\"partner\"")),
        "the listed TCP stream is labelled with the ExternalService:\n{metrics}"
    );
    drop(sidecar);
    drop(servers);
    Ok(())
}
