//! The ingress gateway serving a `Gateway` with TLS (`plexus proxy --mode ingress --gateway`),
//! checked with real peers: curl and openssl for certificates and routes per hostname, a Rust
//! TLS client opening a new connection per request while a certificate is replaced, and the
//! HTTP→HTTPS redirect.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::process::Command;

use anyhow::{Context as _, Result, bail, ensure};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::http::Request;
use plexus_testkit::http_body_util::{BodyExt as _, Empty};
use plexus_testkit::hyper::client::conn::http1;
use plexus_testkit::hyper_util::rt::TokioIo;
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, eventually, free_port};
use rustls_pki_types::pem::PemObject as _;

mod common;

use common::PLEXUS;
use common::pki::Pki;

impl Pki {
    fn new() -> Result<Pki> {
        Pki::named("gateway test CA")
    }

    /// Writes a certificate as the gateway reads it: `<dir>/default/<name>/tls.crt`, `tls.key`,
    /// each replaced by a rename (as tools that rotate certificates do).
    fn install(&self, dir: &Path, name: &str, cn: &str, hosts: &[&str]) -> Result<()> {
        let (crt, key) = self.issue(cn, hosts)?;
        let d = dir.join("default").join(name);
        std::fs::create_dir_all(&d)?;
        for (file, content) in [("tls.crt", crt), ("tls.key", key)] {
            let tmp = d.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, content)?;
            std::fs::rename(&tmp, d.join(file))?;
        }
        Ok(())
    }
}

/// The gateway under test with its backends.
struct Edge {
    proxy: Proxy,
    https: u16,
    http: u16,
    /// The resources file the gateway reads (re-read when it changes).
    resources: PathBuf,
    tls_dir: PathBuf,
    ca_file: PathBuf,
    pki: Pki,
    _backends: Vec<HttpEcho>,
    _dir: TempDir,
}

const HOSTS: [&str; 3] = ["a.example.com", "b.example.com", "c.example.com"];

/// Gateway `edge`: one HTTPS port with a listener (and a certificate) per host, one HTTP port
/// whose route redirects to HTTPS; each host's route goes to its own backend Service.
async fn edge() -> Result<Edge> {
    let dir = TempDir::new("gateway-tls")?;
    let tls_dir = dir.join("tls");
    let pki = Pki::new()?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem)?;
    let (https, http) = (free_port(), free_port());
    let mut res = Resources::new();
    let mut backends = Vec::new();
    let mut listeners = String::new();
    let mut routes = String::new();
    for host in HOSTS {
        let short = &host[..1];
        pki.install(&tls_dir, &format!("cert-{short}"), &format!("{host} v1"), &[host])?;
        let echo = HttpEcho::start(&format!("backend-{short}")).await?;
        res = res
            .service(&format!("web-{short}"), &[ServicePort::new("http", 8080, Some("http"))])
            .workload(&WorkloadSpec::plain(&format!("web-{short}-1"), &format!("web-{short}"), "http", echo.port()));
        backends.push(echo);
        listeners.push_str(&format!(
            "  - name: https-{short}\n    port: {https}\n    protocol: HTTPS\n    hostname: {host}\n    tls: {{certificateRefs: [{{name: cert-{short}}}]}}\n"
        ));
        routes.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: route-{short}}}\nspec:\n  parentRefs: [{{kind: Gateway, name: edge, sectionName: https-{short}}}]\n  rules: [{{backendRefs: [{{name: web-{short}, port: 8080}}]}}]\n"
        ));
    }
    listeners.push_str(&format!("  - name: http\n    port: {http}\n    protocol: HTTP\n"));
    routes.push_str(&format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: to-https}}\nspec:\n  parentRefs: [{{kind: Gateway, name: edge, sectionName: http}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /keep-port}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, port: {https}}}}}]\n  - filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, statusCode: 301}}}}]\n"
    ));
    let yaml = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge}}\nspec:\n  gatewayClassName: plexus\n  listeners:\n{listeners}{routes}",
        res.to_yaml()
    );
    let file = dir.join("resources.yaml");
    std::fs::write(&file, yaml)?;
    let tls = tls_dir.to_str().context("utf-8")?;
    let extra = ["--tls-dir", tls, "--certificate-poll", "100ms"];
    let proxy = Proxy::start_gateway(PLEXUS, "edge", &file, &extra, &[https, http]).await?;
    Ok(Edge { proxy, https, http, resources: file, tls_dir, ca_file, pki, _backends: backends, _dir: dir })
}

/// `curl` to `https://HOST:PORT/PATH` resolved to 127.0.0.1, verifying with the test CA.
async fn curl_https(edge: &Edge, host: &str, path: &str, extra: &[&str]) -> Result<std::process::Output> {
    let url = format!("https://{host}:{}{path}", edge.https);
    let resolve = format!("{host}:{}:127.0.0.1", edge.https);
    let ca = edge.ca_file.to_str().context("utf-8")?;
    let mut args = vec!["-sS", "--max-time", "10", "--cacert", ca, "--resolve", &resolve, "-D", "-"];
    args.extend_from_slice(extra);
    args.push(&url);
    Ok(Command::new("curl").args(&args).output().await?)
}

/// The subject line and whether a certificate was presented, as `openssl s_client` reports
/// them for `server_name` (none: no SNI).
async fn s_client(port: u16, server_name: Option<&str>) -> Result<(bool, String)> {
    let connect = format!("127.0.0.1:{port}");
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &connect]);
    match server_name {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd.stdin(std::process::Stdio::null()).output().await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let presented = text.contains("BEGIN CERTIFICATE");
    let subject = text.lines().find(|l| l.starts_with("subject=")).unwrap_or_default().to_string();
    Ok((presented, subject))
}

#[tokio::test]
async fn three_hostnames_on_one_https_port_each_get_their_certificate_and_route() -> Result<()> {
    if !plexus_testkit::require_tool("curl") || !plexus_testkit::require_tool("openssl") {
        return Ok(());
    }
    let edge = edge().await?;
    for host in HOSTS {
        let short = &host[..1];
        let (presented, subject) = s_client(edge.https, Some(host)).await?;
        ensure!(presented && subject.contains(&format!("{host} v1")), "{host}: got {subject:?}");
        let out = curl_https(&edge, host, "/hello", &[]).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "{host}: {}{}\ngateway: {}",
            text,
            String::from_utf8_lossy(&out.stderr),
            edge.proxy.stderr_tail(3000)
        );
        ensure!(text.contains(&format!("x-served-by: backend-{short}")), "{host} routed elsewhere:\n{text}");
        // The Host the backend sees is the one the client sent.
        ensure!(text.contains(&format!("\"authority\":\"{host}:{}\"", edge.https)), "{text}");
    }
    // TLS 1.2 and 1.3 both, HTTP/2 by ALPN.
    for (flags, want) in
        [(&["--tlsv1.2", "--tls-max", "1.2", "--http1.1"][..], "HTTP/1.1"), (&["--tlsv1.3", "--http2"][..], "HTTP/2")]
    {
        let out = curl_https(&edge, "a.example.com", "/v", flags).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.starts_with(want),
            "{flags:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An unknown server name, or none, gets no certificate at all (no listener without a
    // hostname on this port): the handshake is refused.
    for name in [Some("unknown.example.com"), Some("a.example.com.evil"), None] {
        let (presented, subject) = s_client(edge.https, name).await?;
        ensure!(!presented, "{name:?} got a certificate: {subject}");
    }
    let out = curl_https(&edge, "unknown.example.com", "/", &["-k"]).await?;
    ensure!(!out.status.success(), "unknown SNI was served even without verification");
    // A Host of another listener than the TLS server name: 421, not the other host's route.
    let out = curl_https(&edge, "a.example.com", "/", &["-H", "host: b.example.com"]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.starts_with("HTTP/1.1 421") || text.starts_with("HTTP/2 421"), "{text}");
    ensure!(!text.contains("backend-b"), "{text}");
    // The gateway's /config shows the certificates it serves.
    let config = edge.proxy.admin_get("/config").await?.json()?;
    let certs = config["gateway"]["certificates"].as_array().context("certificates")?;
    ensure!(certs.len() == 3 && certs.iter().all(|c| c["loaded"] == true && c.get("problem").is_none()), "{config:#}");
    Ok(())
}

/// A TLS client trusting the test CA, of TLS `versions`, resuming sessions or not.
fn connector(
    edge: &Edge,
    versions: &[&'static rustls::SupportedProtocolVersion],
    resume: bool,
) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(edge.pki.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_new_connections_without_failed_requests() -> Result<()> {
    let edge = edge().await?;
    // Every connection a full handshake: a resumed session reports the certificate of the
    // session it resumes, not the one the gateway serves now.
    let connector = connector(&edge, rustls::DEFAULT_VERSIONS, false)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], edge.https));
    // ~200 requests/s, each on a new TLS connection, for 3 s; the certificate changes after 1 s.
    let failures = Arc::new(AtomicU64::new(0));
    let (old_seen, new_seen) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let started = tokio::time::Instant::now();
    let mut replaced = false;
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        tick.tick().await;
        if !replaced && started.elapsed() > Duration::from_secs(1) {
            edge.pki.install(&edge.tls_dir, "cert-a", "a.example.com v2", &["a.example.com"])?;
            replaced = true;
        }
        let (connector, failures, old_seen, new_seen) =
            (connector.clone(), failures.clone(), old_seen.clone(), new_seen.clone());
        sent += 1;
        tasks.spawn(async move {
            match one_request(&connector, addr).await {
                Ok(seen) if !seen.v2 => old_seen.fetch_add(1, Ordering::Relaxed),
                Ok(_) => new_seen.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("request failed: {e:#}");
                    failures.fetch_add(1, Ordering::Relaxed)
                }
            };
        });
    }
    while tasks.join_next().await.is_some() {}
    let (failed, old, new) =
        (failures.load(Ordering::Relaxed), old_seen.load(Ordering::Relaxed), new_seen.load(Ordering::Relaxed));
    eprintln!("sent {sent}: {old} with the old certificate, {new} with the new one, {failed} failed");
    ensure!(failed == 0, "{failed} of {sent} requests failed");
    ensure!(old > 0 && new > 0, "old {old}, new {new}: the certificate was not swapped under load");
    // From now on every new connection sees the new certificate.
    let (_, subject) = s_client(edge.https, Some("a.example.com")).await?;
    ensure!(subject.contains("a.example.com v2"), "{subject}");
    // A broken replacement keeps the last good certificate and is reported.
    let d = edge.tls_dir.join("default").join("cert-a");
    std::fs::write(d.join("tls.crt"), "not a certificate")?;
    let problem = eventually(Duration::from_secs(10), || async {
        let config = edge.proxy.admin_get("/config").await?.json()?;
        let certs = config["gateway"]["certificates"].as_array().cloned().unwrap_or_default();
        let a = certs.iter().find(|c| c["name"] == "default/cert-a").cloned().unwrap_or_default();
        match a.get("problem").and_then(|p| p.as_str()) {
            Some(p) => Ok(p.to_string()),
            None => bail!("no problem reported yet: {a}"),
        }
    })
    .await?;
    ensure!(problem.contains("tls.crt"), "{problem}");
    let (presented, subject) = s_client(edge.https, Some("a.example.com")).await?;
    ensure!(presented && subject.contains("a.example.com v2"), "{subject}");
    Ok(())
}

/// Session resumption is on by default and follows the listener's `tls.options`
/// (`plexus.dev/session-resumption`), with TLS 1.3 and TLS 1.2, changed at run time without
/// closing the port or its open connections.
#[tokio::test]
async fn session_resumption_follows_the_listener_tls_option() -> Result<()> {
    let edge = edge().await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], edge.https));
    let versions: [&[&'static rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];
    // Each request's answer is 200 (checked in one_request): the positive control.
    // Of a client's second and third connections, how many resumed the session of its first.
    let resumed = |connector: tokio_rustls::TlsConnector| async move {
        let first = one_request(&connector, addr).await?;
        ensure!(!first.resumed, "the first connection resumed a session it cannot have");
        let (second, third) = (one_request(&connector, addr).await?, one_request(&connector, addr).await?);
        Ok::<_, anyhow::Error>(usize::from(second.resumed) + usize::from(third.resumed))
    };
    for v in versions {
        let n = resumed(connector(&edge, v, true)?).await?;
        ensure!(n == 2, "{v:?}: on by default, yet {n} of 2 sessions were resumed");
    }
    // A connection open across the change keeps working.
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector(&edge, rustls::DEFAULT_VERSIONS, false)?
        .connect(rustls_pki_types::ServerName::try_from("a.example.com")?, tcp)
        .await?;
    let (mut open, conn) = http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    // Off on one listener of the port: off for the port (one TLS setup serves its listeners).
    let yaml = std::fs::read_to_string(&edge.resources)?;
    let off = yaml.replace(
        "tls: {certificateRefs: [{name: cert-b}]}",
        "tls: {certificateRefs: [{name: cert-b}], options: {plexus.dev/session-resumption: \"off\"}}",
    );
    ensure!(off != yaml, "the listener to change is not in the resources");
    std::fs::write(&edge.resources, off)?;
    // Applied once a client holding a session of the port is refused its resumption.
    eventually(Duration::from_secs(10), || async {
        ensure!(resumed(connector(&edge, versions[0], true)?).await? == 0, "still resumed");
        Ok(())
    })
    .await?;
    for v in versions {
        let n = resumed(connector(&edge, v, true)?).await?;
        ensure!(n == 0, "{v:?}: off, yet {n} of 2 sessions were resumed");
    }
    let req = Request::builder().uri("/still-open").header("host", "a.example.com").body(Empty::<Bytes>::new())?;
    let resp = open.send_request(req).await.context("the connection open across the change")?;
    ensure!(resp.status() == 200, "{}", resp.status());
    Ok(())
}

/// An HTTPS keep-alive connection left quiet is parked (the gateway frees hyper's buffers
/// over the TLS session, `plexus_http_connections_parked`) and its next request, on the same
/// TLS session, is served; a second connection that keeps sending is never parked.
#[tokio::test]
async fn a_quiet_https_connection_is_parked_and_serves_its_next_request() -> Result<()> {
    let edge = edge().await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], edge.https));
    let open = || async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = connector(&edge, rustls::DEFAULT_VERSIONS, false)?
            .connect(rustls_pki_types::ServerName::try_from("a.example.com")?, tcp)
            .await?;
        let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
        Ok::<_, anyhow::Error>((sender, tokio::spawn(conn)))
    };
    let get = |sender: &mut http1::SendRequest<Empty<Bytes>>, path: &str| {
        let req = Request::builder().uri(path).header("host", "a.example.com").body(Empty::<Bytes>::new());
        let sent = req.map(|req| sender.send_request(req));
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), sent?).await.context("no answer")??;
            let status = resp.status();
            resp.into_body().collect().await?;
            ensure!(status == 200, "status {status}");
            Ok::<_, anyhow::Error>(())
        }
    };
    let (mut quiet, quiet_conn) = open().await?;
    let (mut busy, _busy_conn) = open().await?;
    get(&mut quiet, "/first").await.context("positive control")?;
    // The busy connection sends a request every 200 ms, well inside the park time (2 s).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy_task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                get(&mut busy, &format!("/busy/{i}")).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                i += 1;
            }
            Ok::<_, anyhow::Error>(())
        }
    });
    eventually(Duration::from_secs(10), || async {
        let n = edge.proxy.metric("plexus_http_connections_parked").await?;
        ensure!(n == 1.0, "{n} connections parked, waiting for the quiet one alone");
        Ok(())
    })
    .await?;
    ensure!(!quiet_conn.is_finished(), "the parked connection was closed");
    get(&mut quiet, "/after-park").await.context("the parked connection's next request")?;
    stop.store(true, Ordering::Relaxed);
    busy_task.await??;
    Ok(())
}

/// What one request on a new connection saw.
struct Seen {
    /// The certificate of `a.example.com v2`, not v1.
    v2: bool,
    /// The TLS session was resumed, not a full handshake.
    resumed: bool,
}

/// One GET on a new TLS connection to a.example.com.
async fn one_request(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Result<Seen> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("a.example.com")?;
        let tls = connector.connect(name, tcp).await?;
        let session = tls.get_ref().1;
        let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let leaf = session.peer_certificates().and_then(|c| c.first()).context("no certificate")?.clone();
        let (mut sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = Request::builder().uri("/load").header("host", "a.example.com").body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        ensure!(status == 200, "status {status}");
        // The common name is in the DER as is.
        let text = String::from_utf8_lossy(leaf.as_ref()).into_owned();
        Ok(Seen { v2: text.contains("a.example.com v2"), resumed })
    })
    .await
    .context("no answer within 10 s")?
}

#[tokio::test]
async fn http_to_https_redirect_keeps_host_path_and_query() -> Result<()> {
    if !plexus_testkit::require_tool("curl") {
        return Ok(());
    }
    let edge = edge().await?;
    let get = |path: &str| {
        let url = format!("http://b.example.com:{}{path}", edge.http);
        let resolve = format!("b.example.com:{}:127.0.0.1", edge.http);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--resolve", &resolve, "-D", "-", "-o", "/dev/null", &url]);
        async move { cmd.output().await }
    };
    let out = get("/page?x=1").await?;
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    ensure!(text.starts_with("http/1.1 301"), "{text}");
    // The scheme changes and no port is given: the https default port, so none in Location.
    ensure!(text.contains("location: https://b.example.com/page?x=1\r\n"), "{text}");
    let out = get("/keep-port/x").await?;
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    ensure!(text.starts_with("http/1.1 302"), "{text}");
    ensure!(text.contains(&format!("location: https://b.example.com:{}/keep-port/x\r\n", edge.https)), "{text}");
    // Following it lands on the HTTPS listener of that host.
    let url = format!("http://b.example.com:{}/keep-port/x", edge.http);
    let resolve_http = format!("b.example.com:{}:127.0.0.1", edge.http);
    let resolve_https = format!("b.example.com:{}:127.0.0.1", edge.https);
    let ca = edge.ca_file.to_str().context("utf-8")?;
    let out = Command::new("curl")
        .args([
            "-sS",
            "-L",
            "--max-time",
            "10",
            "--cacert",
            ca,
            "--resolve",
            &resolve_http,
            "--resolve",
            &resolve_https,
            "-D",
            "-",
            &url,
        ])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("x-served-by: backend-b"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // The gateway forwards nothing else: CONNECT, and a host no listener serves.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-p",
            "-x",
            &format!("http://127.0.0.1:{}", edge.http),
            "http://127.0.0.1:7701/",
        ])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains(" 403"), "CONNECT through the gateway: {text}");
    Ok(())
}
