//! Workload identity end to end, with real `plexus control` processes: `plexus identity
//! init|show|rotate`, CSR signing over gRPC (checked by openssl, independently of the code
//! under test), the trust bundle in discovery responses, anchor rotation without downtime as a
//! simulated proxy sees it, and `plexus check`'s identity checks.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail, ensure};
use plexus_api::discovery::discovery_client::DiscoveryClient;
use plexus_api::discovery::{ProxyInfo, WatchRequest, WatchResponse};
use plexus_api::identity::identity_client::IdentityClient;
use plexus_api::identity::{CertifyRequest, CertifyResponse};
use plexus_control::api_types::{IdentityStatus, ProxiesResponse, TokenList};
use plexus_testkit::{TempDir, free_port, require_tool, serial};
use serde_json::Value;
use tokio::sync::mpsc;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");
const STEP: Duration = Duration::from_secs(60);

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn show(o: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Runs a command with a timeout, whatever its exit status.
async fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = plexus_testkit::command(program);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    plexus_testkit::run(&mut cmd, STEP).await
}

/// Runs openssl and fails with its output unless it exits 0.
async fn openssl(args: &[&str]) -> Result<String> {
    let o = run("openssl", args, &[]).await?;
    ensure!(o.status.success(), "openssl {}: {}", args.join(" "), show(&o));
    Ok(stdout(&o))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// SHA-256 fingerprint by openssl, lower-case hex without colons (as proxies report it).
async fn fingerprint(cert: &Path) -> Result<String> {
    let out = openssl(&["x509", "-noout", "-fingerprint", "-sha256", "-in", path(cert)]).await?;
    let hex = out.trim().rsplit('=').next().context("fingerprint")?;
    Ok(hex.replace(':', "").to_ascii_lowercase())
}

/// Serial by openssl, lower-case hex without colons.
async fn serial_of(cert: &Path) -> Result<String> {
    let out = openssl(&["x509", "-noout", "-serial", "-in", path(cert)]).await?;
    Ok(out.trim().trim_start_matches("serial=").to_ascii_lowercase())
}

fn plain_hex(s: &str) -> String {
    s.replace(':', "").to_ascii_lowercase()
}

/// A key and a CSR made by openssl. The CSR asks for names the control plane must ignore.
async fn csr(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
    let (key, der) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.csr")));
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=asks-for-something-else",
        "-addext",
        "subjectAltName=URI:spiffe://evil.example/ns/x/sa/y,DNS:evil.example",
        "-keyout",
        path(&key),
        "-outform",
        "DER",
        "-out",
        path(&der),
    ])
    .await?;
    Ok((key, std::fs::read(&der)?))
}

/// Every PEM certificate block of `text`.
fn pem_blocks(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----")
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .map(|b| format!("{}\n", b.trim_start()))
        .collect()
}

/// A `plexus control` process on free ports with its own data dir, logging at debug level to
/// a file; killed on drop.
struct ControlPlane {
    child: Child,
    server: String,
    grpc: String,
    data_dir: PathBuf,
    log: PathBuf,
}

/// The registration TTL of a control plane started with [`SHORT_TTL`] (15 s by default): an
/// anchor rotation settles this long after a start. [`SimProxy`] sends a message every 2 s.
const TTL: Duration = Duration::from_secs(6);
const SHORT_TTL: [&str; 2] = ["--registration-ttl", "6s"];

impl ControlPlane {
    fn start(data_dir: &Path, log: &Path) -> Result<ControlPlane> {
        ControlPlane::start_with(data_dir, log, &[])
    }

    /// [`ControlPlane::start`] with more `plexus control` arguments (e.g. [`SHORT_TTL`]).
    fn start_with(data_dir: &Path, log: &Path, extra: &[&str]) -> Result<ControlPlane> {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(PLEXUS)
            .args(["control", "--http-addr", &addr, "--grpc-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log)?)
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let ready: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                bail!("no ready line: {line:?}\n{}", std::fs::read_to_string(log).unwrap_or_default());
            }
        };
        let grpc = ready["grpc"].as_str().context("grpc address")?.to_string();
        Ok(ControlPlane {
            child,
            server: format!("http://{addr}"),
            grpc: format!("http://{grpc}"),
            data_dir: data_dir.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    async fn plexus(&self, args: &[&str]) -> Result<Output> {
        run(PLEXUS, args, &[("PLEXUS_SERVER", &self.server), ("PLEXUS_DATA_DIR", path(&self.data_dir))]).await
    }

    /// `plexus ARGS`, failing with the output unless it exits 0.
    async fn plexus_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.plexus(args).await?;
        ensure!(o.status.success(), "plexus {}: {}", args.join(" "), show(&o));
        Ok(stdout(&o))
    }

    /// A workload token for `namespace`/`service_account` (`plexus token create`).
    async fn token(&self, namespace: &str, service_account: &str) -> Result<String> {
        plexus_testkit::workload_token(PLEXUS, &self.server, &self.data_dir, namespace, service_account).await
    }

    /// `GET path` on the HTTP API, as JSON.
    /// [`Self::get`] read as the typed row the CLI reads it as.
    async fn get_as<T: serde::de::DeserializeOwned>(&self, api_path: &str) -> Result<T> {
        Ok(serde_json::from_value(self.get(api_path).await?)?)
    }

    async fn get(&self, api_path: &str) -> Result<Value> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let authority = self.server.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(authority).await?;
        s.write_all(format!("GET {api_path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        tokio::time::timeout(STEP, s.read_to_string(&mut text)).await??;
        let body = text.split("\r\n\r\n").nth(1).context("no body")?;
        serde_json::from_str(body).with_context(|| format!("not JSON: {text}"))
    }

    async fn certify(
        &self,
        token: &str,
        ns: &str,
        sa: &str,
        csr_der: Vec<u8>,
    ) -> Result<CertifyResponse, tonic::Status> {
        let mut client =
            IdentityClient::new(self.channel(token).await.map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?);
        let request = CertifyRequest {
            token: token.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            csr_der: csr_der.into(),
        };
        client.certify(request).await.map(tonic::Response::into_inner)
    }

    /// A TLS channel to the gRPC port, verifying the control plane against the anchor `token`
    /// pins (this control plane's anchor when `token` pins none), without a client certificate.
    async fn channel(&self, token: &str) -> Result<tonic::transport::Channel> {
        let pin = match plexus_proxy::cp_tls::pinned_anchor(token) {
            Some(_) => token.to_string(),
            None => format!("x.{}", fingerprint(&self.data_dir.join("trust-anchor.pem")).await?),
        };
        let tls = plexus_proxy::cp_tls::ControlPlaneTls::new(&pin, None, None)?;
        tls.channel(&self.grpc, |e| e.connect_timeout(Duration::from_secs(5))).await
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A leaf certificate the test holds, as files for openssl.
struct Issued {
    leaf: PathBuf,
    issuer: PathBuf,
    bundle: PathBuf,
    response: CertifyResponse,
}

async fn issue(cp: &ControlPlane, dir: &Path, name: &str, sa: &str) -> Result<Issued> {
    let (_, der) = csr(dir, name).await?;
    let token = cp.token("default", sa).await?;
    // Just after an anchor rotation the control plane may still serve its certificate from the
    // old issuer for a moment: a client pinning the new anchor retries, as proxies do.
    let response = plexus_testkit::eventually(Duration::from_secs(15), || {
        let (token, der) = (token.clone(), der.clone());
        async move { cp.certify(&token, "default", sa, der).await.map_err(|s| anyhow::anyhow!("{s:?}")) }
    })
    .await?;
    let blocks = pem_blocks(&response.certificate_chain_pem);
    ensure!(blocks.len() == 2, "the chain is leaf + issuer: {}", response.certificate_chain_pem);
    let (leaf, issuer, bundle) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-issuer.pem")),
        dir.join(format!("{name}-bundle.pem")),
    );
    std::fs::write(&leaf, &blocks[0])?;
    std::fs::write(&issuer, &blocks[1])?;
    std::fs::write(&bundle, &response.trust_bundle_pem)?;
    Ok(Issued { leaf, issuer, bundle, response })
}

/// `openssl verify -CAfile bundle -untrusted issuer leaf`.
async fn verifies(bundle: &Path, issuer: &Path, leaf: &Path) -> Result<bool> {
    let o = run("openssl", &["verify", "-CAfile", path(bundle), "-untrusted", path(issuer), path(leaf)], &[]).await?;
    Ok(o.status.success() && stdout(&o).contains(": OK"))
}

/// A proxy's side of a discovery Watch stream: acknowledges every response, heartbeats every
/// 2 s, and reports the certificate the test says it holds.
struct SimProxy {
    requests: mpsc::Sender<WatchRequest>,
    responses: mpsc::UnboundedReceiver<WatchResponse>,
    current: Arc<Mutex<WatchRequest>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimProxy {
    async fn connect(cp: &ControlPlane, workload: &str) -> Result<SimProxy> {
        let (requests, rx) = mpsc::channel(16);
        let first = WatchRequest {
            proxy: Some(ProxyInfo {
                workload: workload.into(),
                namespace: "default".into(),
                service: workload.into(),
                mode: "sidecar".into(),
                // No token: the stream registers nothing.
                token: String::new(),
                ..Default::default()
            }),
            ..Default::default()
        };
        requests.send(first).await?;
        // Discovery needs mTLS: enrol as the workload's own service account.
        let token = cp.token("default", workload).await?;
        let tls = plexus_testkit::eventually(Duration::from_secs(15), || {
            let token = token.clone();
            async move { Ok(plexus_proxy::cp_tls::enroll(&cp.grpc, &token).await?.1) }
        })
        .await?;
        let mut client = DiscoveryClient::new(tls.channel(&cp.grpc, |e| e).await?);
        let mut stream = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let current = Arc::new(Mutex::new(WatchRequest::default()));
        let (resp_tx, responses) = mpsc::unbounded_channel();
        let reader = {
            let (current, requests) = (current.clone(), requests.clone());
            tokio::spawn(async move {
                while let Ok(Some(r)) = stream.message().await {
                    let ack = {
                        let mut c = current.lock().expect("lock");
                        c.applied_revision = r.revision;
                        c.clone()
                    };
                    let _ = requests.send(ack).await;
                    if resp_tx.send(r).is_err() {
                        break;
                    }
                }
            })
        };
        let heartbeat = {
            let (current, requests) = (current.clone(), requests.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let msg = current.lock().expect("lock").clone();
                    if requests.send(msg).await.is_err() {
                        break;
                    }
                }
            })
        };
        Ok(SimProxy { requests, responses, current, tasks: vec![reader, heartbeat] })
    }

    /// Reports holding `cert` (`None`: no certificate) from now on.
    async fn report(&self, serial: &str, issuer_sha256: &str, not_after_unix: i64, spiffe_id: &str) -> Result<()> {
        let msg = {
            let mut c = self.current.lock().expect("lock");
            c.certificate_serial = serial.into();
            c.certificate_issuer_sha256 = issuer_sha256.into();
            c.certificate_not_after_unix = not_after_unix;
            c.spiffe_id = spiffe_id.into();
            c.clone()
        };
        self.requests.send(msg).await?;
        Ok(())
    }

    async fn report_issued(&self, issued: &Issued) -> Result<()> {
        self.report(
            &serial_of(&issued.leaf).await?,
            &fingerprint(&issued.issuer).await?,
            issued.response.not_after_unix,
            &issued.response.spiffe_id,
        )
        .await
    }

    /// Reads responses until one carries a trust bundle of `n` anchors; returns that bundle.
    async fn bundle_of(&mut self, n: usize, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.responses.recv()).await {
                Ok(Some(r)) => {
                    let count = pem_blocks(&r.trust_bundle_pem).len();
                    if count == n {
                        return Ok(r.trust_bundle_pem);
                    }
                    seen.push(count);
                }
                Ok(None) => bail!("the Watch stream ended (bundles seen: {seen:?})"),
                Err(_) => bail!("no WatchResponse with {n} anchors within {within:?} (bundles seen: {seen:?})"),
            }
        }
    }
}

impl Drop for SimProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Writes an openssl CA for bring-your-own tests: anchor, issuer, an issuer signed by another
/// anchor, an expired issuer, and a leaf (not a CA).
async fn openssl_ca(dir: &Path) -> Result<()> {
    let p = |n: &str| dir.join(n).to_string_lossy().to_string();
    let self_signed = |cn: &'static str, key: String, out: String| async move {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &key,
            "-out",
            &out,
        ])
        .await
    };
    self_signed("BYO anchor", p("anchor-key.pem"), p("anchor.pem")).await?;
    self_signed("other anchor", p("other-key.pem"), p("other.pem")).await?;
    for name in ["issuer", "leaf"] {
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN=BYO {name}"),
            "-keyout",
            &p(&format!("{name}-key.pem")),
            "-out",
            &p(&format!("{name}.csr")),
        ])
        .await?;
    }
    std::fs::write(
        dir.join("ca-ext.cnf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )?;
    std::fs::write(dir.join("leaf-ext.cnf"), "basicConstraints=critical,CA:FALSE\n")?;
    for (out, csr_name, ca, ext) in [
        ("issuer.pem", "issuer.csr", "anchor", "ca-ext.cnf"),
        ("stranger.pem", "issuer.csr", "other", "ca-ext.cnf"),
        ("leaf.pem", "leaf.csr", "anchor", "leaf-ext.cnf"),
    ] {
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(csr_name),
            "-CA",
            &p(&format!("{ca}.pem")),
            "-CAkey",
            &p(&format!("{ca}-key.pem")),
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            &p(ext),
            "-out",
            &p(out),
        ])
        .await?;
    }
    // An issuer that expired in 2020 (`openssl ca` can set past dates).
    std::fs::write(dir.join("index.txt"), "")?;
    std::fs::write(dir.join("serial.txt"), "01\n")?;
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\nserial=serial.txt\ndefault_md=sha256\npolicy=p\nx509_extensions=x\n[p]\ncommonName=supplied\n[x]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )?;
    let mut cmd = plexus_testkit::command("openssl");
    cmd.current_dir(dir).args([
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-cert",
        "anchor.pem",
        "-keyfile",
        "anchor-key.pem",
        "-in",
        "issuer.csr",
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200201000000Z",
        "-out",
        "expired.pem",
    ]);
    plexus_testkit::run_ok(&mut cmd, STEP).await?;
    Ok(())
}

fn mode(p: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_creates_or_imports_a_ca_and_show_reads_it_without_a_control_plane() -> Result<()> {
    if !require_tool("openssl") {
        return Ok(());
    }
    let dir = TempDir::new("identity-init")?;
    let data = dir.join("data");
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let cli = |args: Vec<&str>| {
        let mut all = args;
        all.extend(["--server", &nobody]);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        async move { run(PLEXUS, &all.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await }
    };

    // Generated: a P-256 chain openssl verifies, keys 0600.
    let o = cli(vec!["identity", "init", "--data-dir", path(&data), "--trust-domain", "example.org"]).await?;
    ensure!(o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains("created a trust anchor and issuer"), "{}", show(&o));
    for key in ["trust-anchor-key.pem", "issuer-key.pem"] {
        assert_eq!(mode(&data.join(key))?, 0o600, "{key}");
    }
    openssl(&["verify", "-CAfile", path(&data.join("trust-anchor.pem")), path(&data.join("issuer.pem"))]).await?;
    let text = openssl(&["x509", "-noout", "-text", "-in", path(&data.join("issuer.pem"))]).await?;
    assert!(text.contains("CA:TRUE") && text.contains("prime256v1") && text.contains("example.org"), "{text}");

    // Never overwritten by accident; replaced with --force.
    let anchor_before = std::fs::read(data.join("trust-anchor.pem"))?;
    let o = cli(vec!["identity", "init", "--data-dir", path(&data)]).await?;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a certificate authority"), "{}", show(&o));
    assert_eq!(std::fs::read(data.join("trust-anchor.pem"))?, anchor_before);
    let o = cli(vec!["identity", "init", "--data-dir", path(&data), "--force"]).await?;
    ensure!(o.status.success(), "{}", show(&o));
    assert_ne!(std::fs::read(data.join("trust-anchor.pem"))?, anchor_before, "--force replaced the CA");

    // `show` without a control plane reads the data dir: the fingerprints and serials openssl sees.
    let o = cli(vec!["identity", "show", "--data-dir", path(&data)]).await?;
    ensure!(o.status.success(), "{}", show(&o));
    let table = stdout(&o);
    let anchor_fp = fingerprint(&data.join("trust-anchor.pem")).await?;
    let issuer_fp = fingerprint(&data.join("issuer.pem")).await?;
    for needle in ["trust anchor", "issuer", "DAYS LEFT", "control plane unreachable", &anchor_fp, &issuer_fp] {
        assert!(table.contains(needle), "{needle:?} in\n{table}");
    }
    let o = cli(vec!["identity", "show", "--data-dir", path(&data), "-o", "json"]).await?;
    ensure!(o.status.success(), "{}", show(&o));
    let v: Value = serde_json::from_slice(&o.stdout).with_context(|| show(&o))?;
    assert_eq!(v["controlPlane"]["reachable"], false);
    assert_eq!(v["trustBundle"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["trustBundle"][0]["sha256"], anchor_fp.as_str());
    assert_eq!(plain_hex(v["issuer"]["serial"].as_str().unwrap_or("")), serial_of(&data.join("issuer.pem")).await?);
    assert!(v["issuer"]["daysLeft"].as_i64().is_some_and(|d| (363..=365).contains(&d)), "{v}");

    // Bring your own CA, made by openssl.
    let ca = dir.join("byo");
    std::fs::create_dir_all(&ca)?;
    openssl_ca(&ca).await?;
    let byo = dir.join("byo-data");
    let f = |n: &str| ca.join(n).to_string_lossy().to_string();
    let import = |issuer: String, key: String, target: PathBuf| {
        let (anchor, target) = (f("anchor.pem"), target.to_string_lossy().to_string());
        async move {
            let args = [
                "identity",
                "init",
                "--data-dir",
                &target,
                "--anchor-cert",
                &anchor,
                "--issuer-cert",
                &issuer,
                "--issuer-key",
                &key,
            ];
            run(PLEXUS, &args, &[]).await
        }
    };
    for (issuer, key, expected) in [
        (
            "stranger.pem",
            "issuer-key.pem",
            "the issuer (CN=BYO issuer) is not signed by the trust anchor (CN=BYO anchor)",
        ),
        ("issuer.pem", "anchor-key.pem", "the issuer key does not belong to the issuer certificate"),
        ("leaf.pem", "leaf-key.pem", "the issuer is not a CA certificate"),
        ("expired.pem", "issuer-key.pem", "the issuer expired on 2020-02-01"),
    ] {
        let o = import(f(issuer), f(key), byo.clone()).await?;
        assert_eq!(o.status.code(), Some(2), "{issuer}: {}", show(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("cannot import the certificate authority") && err.contains(expected), "{issuer}: {err}");
        assert!(!byo.join("issuer.pem").exists(), "{issuer}: nothing written");
    }
    let o =
        run(PLEXUS, &["identity", "init", "--data-dir", path(&byo), "--anchor-cert", &f("anchor.pem")], &[]).await?;
    assert_eq!(o.status.code(), Some(2), "the three files go together: {}", show(&o));

    let o = import(f("issuer.pem"), f("issuer-key.pem"), byo.clone()).await?;
    ensure!(o.status.success(), "{}", show(&o));
    assert_eq!(fingerprint(&byo.join("issuer.pem")).await?, fingerprint(&ca.join("issuer.pem")).await?);
    assert_eq!(fingerprint(&byo.join("trust-anchor.pem")).await?, fingerprint(&ca.join("anchor.pem")).await?);
    assert_eq!(mode(&byo.join("issuer-key.pem"))?, 0o600);
    assert!(!byo.join("trust-anchor-key.pem").exists(), "the anchor's key stays with its owner");
    let same_key = |p: PathBuf| async move { openssl(&["pkey", "-pubout", "-in", path(&p)]).await };
    assert_eq!(same_key(byo.join("issuer-key.pem")).await?, same_key(ca.join("issuer-key.pem")).await?);

    // A control plane on the imported CA signs leaves that chain to it; the issuer cannot be
    // rotated without the anchor's key.
    let cp = ControlPlane::start(&byo, &dir.join("byo-control.log"))?;
    let issued = issue(&cp, dir.path(), "byo-leaf", "reviews").await?;
    assert!(verifies(&ca.join("anchor.pem"), &ca.join("issuer.pem"), &issued.leaf).await?);
    let o = cp.plexus(&["identity", "rotate"]).await?;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the trust anchor's key is not in"), "{}", show(&o));
    let table = cp.plexus_ok(&["identity", "show"]).await?;
    assert!(table.contains("trust anchor key: not in the data dir (imported CA)"), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_signs_a_spiffe_leaf_openssl_verifies_and_refuses_a_wrong_token() -> Result<()> {
    if !require_tool("openssl") {
        return Ok(());
    }
    let dir = TempDir::new("identity-certify")?;
    let cp = ControlPlane::start(&dir.join("data"), &dir.join("control.log"))?;
    let token = cp.token("default", "reviews").await?;

    let (key, der) = csr(dir.path(), "reviews").await?;
    let started = unix_now();
    let r = cp.certify(&token, "default", "reviews", der.clone()).await.map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let blocks = pem_blocks(&r.certificate_chain_pem);
    assert_eq!(blocks.len(), 2, "leaf then issuer: {}", r.certificate_chain_pem);
    let (leaf, issuer, bundle) = (dir.join("leaf.pem"), dir.join("issuer.pem"), dir.join("bundle.pem"));
    std::fs::write(&leaf, &blocks[0])?;
    std::fs::write(&issuer, &blocks[1])?;
    std::fs::write(&bundle, &r.trust_bundle_pem)?;
    assert!(verifies(&bundle, &issuer, &leaf).await?, "openssl verify -CAfile bundle -untrusted issuer leaf");
    assert_eq!(fingerprint(&issuer).await?, fingerprint(&cp.data_dir.join("issuer.pem")).await?);
    assert_eq!(fingerprint(&bundle).await?, fingerprint(&cp.data_dir.join("trust-anchor.pem")).await?);
    assert_eq!(pem_blocks(&r.trust_bundle_pem).len(), 1);

    // Exactly the SPIFFE URI SAN, whatever the CSR asked for; usages of a mesh workload.
    let id = "spiffe://plexus.local/ns/default/sa/reviews";
    assert_eq!(r.spiffe_id, id);
    let san = openssl(&["x509", "-noout", "-ext", "subjectAltName", "-in", path(&leaf)]).await?;
    let names: Vec<&str> = san.lines().skip(1).flat_map(|l| l.split(',')).map(str::trim).collect();
    assert_eq!(names, vec![format!("URI:{id}")], "{san}");
    let ext =
        openssl(&["x509", "-noout", "-ext", "basicConstraints,keyUsage,extendedKeyUsage", "-in", path(&leaf)]).await?;
    for needle in [
        "CA:FALSE",
        "Digital Signature, Key Encipherment",
        "TLS Web Server Authentication, TLS Web Client Authentication",
    ] {
        assert!(ext.contains(needle), "{needle:?} in {ext}");
    }
    assert!(!openssl(&["x509", "-noout", "-subject", "-in", path(&leaf)]).await?.contains("asks-for"));
    // The leaf certifies the CSR's key.
    assert_eq!(
        openssl(&["x509", "-noout", "-pubkey", "-in", path(&leaf)]).await?,
        openssl(&["pkey", "-pubout", "-in", path(&key)]).await?
    );
    // 24h by default, valid from a minute ago (clock skew).
    let lifetime = r.not_after_unix - started;
    assert!((86_400 - 5..=86_400 + 60).contains(&lifetime), "24h lifetime, got {lifetime}s");
    openssl(&["x509", "-noout", "-checkend", "86000", "-in", path(&leaf)]).await?;
    let o = run("openssl", &["x509", "-noout", "-checkend", "86500", "-in", path(&leaf)], &[]).await?;
    assert!(!o.status.success(), "expires within 24h: {}", show(&o));

    // MeshConfig sets the trust domain and the leaf lifetime.
    let mesh_config = dir.join("mesh.yaml");
    std::fs::write(
        &mesh_config,
        "apiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec:\n  trustDomain: corp.example\n  certificates: {leafLifetime: 1h}\n",
    )?;
    cp.plexus_ok(&["apply", "-f", path(&mesh_config)]).await?;
    let before = unix_now();
    let cart = cp.token("shop", "cart").await?;
    let r = cp.certify(&cart, "shop", "cart", der.clone()).await.map_err(|s| anyhow::anyhow!("{s:?}"))?;
    assert_eq!(r.spiffe_id, "spiffe://corp.example/ns/shop/sa/cart");
    let lifetime = r.not_after_unix - before;
    assert!((3600 - 5..=3600 + 60).contains(&lifetime), "MeshConfig leafLifetime 1h, got {lifetime}s");
    std::fs::write(&leaf, pem_blocks(&r.certificate_chain_pem)[0].as_bytes())?;
    let san = openssl(&["x509", "-noout", "-ext", "subjectAltName", "-in", path(&leaf)]).await?;
    assert!(san.contains("URI:spiffe://corp.example/ns/shop/sa/cart"), "{san}");

    // A wrong token: UNAUTHENTICATED and no certificate.
    let wrong = cp.certify("not-the-token", "default", "reviews", der.clone()).await;
    match wrong {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
            assert!(s.message().contains("malformed workload token"), "{s:?}");
        }
        Ok(r) => panic!("signed with a wrong token: {}", r.certificate_chain_pem),
    }
    let empty = cp.certify("", "default", "reviews", der.clone()).await;
    assert_eq!(empty.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
    // The token is bound to default/reviews: any other identity is refused, naming the binding.
    for (ns, sa) in [("default", "ratings"), ("shop", "reviews"), ("Default", "reviews"), ("default", "a/b")] {
        let s = cp.certify(&token, ns, sa, der.clone()).await.expect_err("refused");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{ns}/{sa}: {s:?}");
        assert!(s.message().contains("is bound to spiffe://corp.example/ns/default/sa/reviews"), "{s:?}");
    }
    let s = cp.certify(&token, "default", "reviews", b"not a CSR".to_vec()).await.expect_err("refused");
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("PKCS#10"), "{s:?}");

    // Keys: owner-only files whose contents never reach the log.
    let data = &cp.data_dir;
    assert_eq!(mode(&data.join("issuer-key.pem"))?, 0o600);
    assert_eq!(mode(&data.join("trust-anchor-key.pem"))?, 0o600);
    let log = cp.log_text();
    assert!(log.contains("issued a workload certificate"), "the log is captured: {log}");
    for key_file in ["issuer-key.pem", "trust-anchor-key.pem"] {
        let pem = std::fs::read_to_string(data.join(key_file))?;
        for line in pem.lines().filter(|l| !l.starts_with("-----") && l.len() > 16) {
            assert!(!log.contains(line), "{key_file} content in the control plane's log");
        }
    }
    assert!(log.contains("certificate request refused"), "refusals are logged");
    assert!(log.contains("certificate request for another identity refused"), "refusals are logged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_is_rate_limited_for_the_whole_control_plane() -> Result<()> {
    if !require_tool("openssl") {
        return Ok(());
    }
    let _serial = serial().await;
    let dir = TempDir::new("identity-rate")?;
    let cp = ControlPlane::start(&dir.join("data"), &dir.join("control.log"))?;
    let token = cp.token("default", "burst").await?;
    let (_, der) = csr(dir.path(), "burst").await?;
    let client = IdentityClient::new(cp.channel(&token).await?);
    // 250 at once: the bucket holds 100 and refills 50/s, so unless signing took over 3 s some
    // are refused.
    let started = Instant::now();
    let calls: Vec<_> = (0..250)
        .map(|_| {
            let mut c = client.clone();
            let request = CertifyRequest {
                token: token.clone(),
                namespace: "default".into(),
                service_account: "burst".into(),
                csr_der: der.clone().into(),
            };
            tokio::spawn(async move { c.certify(request).await.map(|_| ()).map_err(|s| s.code()) })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for call in calls {
        match call.await? {
            Ok(()) => ok += 1,
            Err(tonic::Code::ResourceExhausted) => exhausted += 1,
            Err(other) => bail!("unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(ok >= 100, "the burst is served: {ok} ok, {exhausted} refused in {elapsed:?}");
    assert!(exhausted > 0, "250 requests at once are limited: {ok} ok in {elapsed:?}");
    assert!(
        (ok as f64) <= 100.0 + 50.0 * elapsed.as_secs_f64() + 5.0,
        "at most the burst plus 50/s: {ok} in {elapsed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_anchor_rotation_without_downtime() -> Result<()> {
    if !require_tool("openssl") {
        return Ok(());
    }
    let dir = TempDir::new("identity-rotate")?;
    let data = dir.join("data");
    let mut cp = ControlPlane::start_with(&data, &dir.join("control.log"), &SHORT_TTL)?;
    let original_anchor = dir.join("anchor-1.pem");
    std::fs::copy(data.join("trust-anchor.pem"), &original_anchor)?;

    // A proxy connects: its responses carry the one-anchor bundle; it reports its certificate.
    let mut proxy = SimProxy::connect(&cp, "sim").await?;
    let bundle = proxy.bundle_of(1, STEP).await?;
    assert_eq!(bundle, std::fs::read_to_string(&original_anchor)?, "the bundle is the trust anchor");
    let first = issue(&cp, dir.path(), "first", "sim").await?;
    proxy.report_issued(&first).await?;
    let proxies = plexus_testkit::eventually(Duration::from_secs(10), || async {
        let v: ProxiesResponse = cp.get_as("/api/v1/proxies").await?;
        v.proxies.first().and_then(|p| p.certificate.clone()).with_context(|| format!("no certificate yet: {v:?}"))
    })
    .await?;
    assert_eq!(proxies.issuer_sha256, fingerprint(&first.issuer).await?);
    assert_eq!(proxies.serial, serial_of(&first.leaf).await?);
    assert_eq!(proxies.not_after_unix, first.response.not_after_unix);
    assert_eq!(proxies.spiffe_id, "spiffe://plexus.local/ns/default/sa/sim");
    let report = cp.plexus_ok(&["check"]).await?;
    assert!(report.contains("✓ 1 proxy holds a valid certificate from the current issuer"), "{report}");

    // Issue 16: `check` looks at the control plane's own certificate and at workload tokens:
    // their expiry and the trust anchor each pins (what a proxy bootstrapping with it
    // verifies the control plane against).
    assert!(
        report.contains(
            "✓ control plane certificate spiffe://plexus.local/ns/plexus-system/sa/plexus-control valid until"
        ),
        "{report}"
    );
    assert!(report.contains("✓ the control plane presents the current trust anchor"), "{report}");
    let token_id = |token: &str| token.split('.').nth(1).map(str::to_string).context("token id");
    let pinned = token_id(&cp.token("default", "sim").await?)?;
    let brief = cp
        .plexus_ok(&["token", "create", "--service-account", "brief", "--ttl", "1s"])
        .await?
        .lines()
        .last()
        .map(str::to_string)
        .context("token")?;
    let brief = token_id(&brief)?;
    let report = plexus_testkit::eventually(Duration::from_secs(10), || async {
        let report = cp.plexus_ok(&["check"]).await?;
        ensure!(
            report.contains(&format!("‼ token {brief} (spiffe://plexus.local/ns/default/sa/brief) has expired")),
            "{report}"
        );
        Ok(report)
    })
    .await?;
    assert!(report.contains(" valid tokens, not near expiry, pinning the current trust anchor"), "{report}");

    // Issuer rotation: same anchor, new issuer; old and new leaves both chain to the anchor.
    let out = cp.plexus_ok(&["identity", "rotate"]).await?;
    assert!(out.contains("issuer rotated"), "{out}");
    assert_eq!(std::fs::read_to_string(data.join("trust-anchor.pem"))?, std::fs::read_to_string(&original_anchor)?);
    assert_ne!(fingerprint(&data.join("issuer.pem")).await?, fingerprint(&first.issuer).await?);
    let second = issue(&cp, dir.path(), "second", "sim").await?;
    assert_eq!(fingerprint(&second.issuer).await?, fingerprint(&data.join("issuer.pem")).await?);
    assert!(verifies(&original_anchor, &second.issuer, &second.leaf).await?, "new leaves chain to the same anchor");
    assert!(verifies(&original_anchor, &first.issuer, &first.leaf).await?, "old leaves keep verifying");
    let v: Value = serde_json::from_str(&cp.plexus_ok(&["identity", "show", "-o", "json"]).await?)?;
    assert_eq!(v["proxies"][0]["issuedBy"], "previousIssuer", "{v}");
    let report = cp.plexus_ok(&["check"]).await?;
    assert!(report.contains("‼ 1 proxy holds a certificate from the previous issuer"), "{report}");
    proxy.report_issued(&second).await?;

    // Anchor rotation: the bundle becomes [new anchor, old anchor] and is pushed to the proxy.
    let out = cp.plexus_ok(&["identity", "rotate", "--anchor"]).await?;
    assert!(out.contains("trust anchor rotation started"), "{out}");
    let pushed = proxy.bundle_of(2, Duration::from_secs(10)).await?;
    let blocks = pem_blocks(&pushed);
    assert_eq!(blocks[0], std::fs::read_to_string(data.join("trust-anchor.pem"))?, "the new anchor first");
    assert_eq!(blocks[1], std::fs::read_to_string(&original_anchor)?, "then the old one");
    assert_eq!(std::fs::read_to_string(data.join("previous-trust-anchor.pem"))?, blocks[1]);
    let v: IdentityStatus = cp.get_as("/api/v1/identity").await?;
    assert!(v.rotation.is_some(), "{v:?}");
    assert_eq!(v.chain.trust_bundle.len(), 2);
    // A token pinning the old anchor cannot bootstrap a proxy any more (the control plane
    // presents the new one): ✗ until revoked.
    let o = cp.plexus(&["check"]).await?;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let report = stdout(&o);
    assert!(
        report.contains(&format!(
            "✗ token {pinned} (spiffe://plexus.local/ns/default/sa/sim) pins the previous trust anchor"
        )),
        "{report}"
    );
    // Revoking every token made before the rotation (this test's own too) passes the check.
    let tokens: TokenList = serde_json::from_str(&cp.plexus_ok(&["token", "list", "-o", "json"]).await?)?;
    for t in tokens.items.iter().filter(|t| t.state == "valid") {
        cp.plexus_ok(&["token", "revoke", &t.id]).await?;
    }
    let report = plexus_testkit::eventually(Duration::from_secs(15), || async {
        let report = cp.plexus_ok(&["check"]).await?;
        ensure!(report.contains("✓ the control plane presents the current trust anchor"), "{report}");
        Ok(report)
    })
    .await?;
    assert!(report.contains("‼ rotation in progress: 1 proxy still on the old issuer"), "{report}");
    let o = cp.plexus(&["identity", "rotate", "--anchor"]).await?;
    assert_eq!(o.status.code(), Some(1), "one anchor rotation at a time: {}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in progress"), "{}", show(&o));

    // No downtime: during the rotation old and new leaves both verify against the bundle.
    let third = issue(&cp, dir.path(), "third", "sim").await?;
    assert_eq!(pem_blocks(&third.response.trust_bundle_pem).len(), 2);
    assert!(verifies(&third.bundle, &third.issuer, &third.leaf).await?, "new leaf, two-anchor bundle");
    assert!(verifies(&third.bundle, &second.issuer, &second.leaf).await?, "old leaf, two-anchor bundle");
    assert!(!verifies(&original_anchor, &third.issuer, &third.leaf).await?, "the new leaf is under the new anchor");

    // A restart in the middle continues the rotation.
    drop(proxy);
    cp.stop();
    let cp = ControlPlane::start_with(&data, &dir.join("control-2.log"), &SHORT_TTL)?;
    let restarted = Instant::now();
    let mut proxy = SimProxy::connect(&cp, "sim").await?;
    proxy.report_issued(&second).await?;
    assert_eq!(pem_blocks(&proxy.bundle_of(2, STEP).await?).len(), 2);
    // The report travels on the Watch stream: the table shows it once the control plane read it.
    let table = plexus_testkit::eventually(Duration::from_secs(10), || async {
        let table = cp.plexus_ok(&["identity", "show"]).await?;
        ensure!(table.contains("old anchor (rotating)"), "{table}");
        Ok(table)
    })
    .await?;
    assert!(table.contains("previous anchor") && table.contains("trust anchor rotation in progress"), "{table}");
    // Held back while the proxy is on the old issuer, also past the settle time after a start
    // (the registration TTL, for proxies to reconnect).
    tokio::time::sleep((TTL + Duration::from_secs(3)).saturating_sub(restarted.elapsed())).await;
    assert!(data.join("previous-trust-anchor.pem").exists(), "the old anchor stays while a proxy needs it");
    assert!(cp.get_as::<IdentityStatus>("/api/v1/identity").await?.rotation.is_some());

    // Once the proxy reports a certificate from the new issuer, the old anchor leaves.
    proxy.report_issued(&third).await?;
    let reported = Instant::now();
    let last = proxy.bundle_of(1, Duration::from_secs(10)).await?;
    assert!(reported.elapsed() < Duration::from_secs(5), "finished within seconds of the report");
    assert_eq!(last, std::fs::read_to_string(data.join("trust-anchor.pem"))?, "the new anchor alone");
    assert!(!data.join("previous-trust-anchor.pem").exists());
    let v: IdentityStatus = cp.get_as("/api/v1/identity").await?;
    assert!(v.rotation.is_none(), "{v:?}");
    let report = plexus_testkit::eventually(Duration::from_secs(15), || async {
        let report = cp.plexus_ok(&["check"]).await?;
        ensure!(report.contains("✓ the control plane presents the current trust anchor"), "{report}");
        Ok(report)
    })
    .await?;
    assert!(!report.contains("rotation in progress"), "{report}");
    assert!(report.contains("✓ 1 proxy holds a valid certificate from the current issuer"), "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flags_proxies_without_a_valid_certificate() -> Result<()> {
    if !require_tool("openssl") {
        return Ok(());
    }
    let dir = TempDir::new("identity-check")?;
    let cp = ControlPlane::start(&dir.join("data"), &dir.join("control.log"))?;
    let issued = issue(&cp, dir.path(), "good", "good").await?;
    let current = fingerprint(&cp.data_dir.join("issuer.pem")).await?;

    // `plexus check` gives a proxy this long to get its certificate (10 s by default).
    let grace = Duration::from_secs(5);
    let check = ["check", "--certificate-grace", "5s"];
    let connected = Instant::now();
    let none = SimProxy::connect(&cp, "no-cert").await?;
    let expired = SimProxy::connect(&cp, "expired").await?;
    expired.report("0a", &current, unix_now() - 60, "spiffe://plexus.local/ns/default/sa/expired").await?;
    let stranger = SimProxy::connect(&cp, "stranger").await?;
    stranger.report("0b", &"ab".repeat(32), unix_now() + 3600, "spiffe://plexus.local/ns/default/sa/stranger").await?;
    let good = SimProxy::connect(&cp, "good").await?;
    good.report_issued(&issued).await?;

    // Within the grace period a proxy without a certificate is not a failure yet.
    let o = cp.plexus(&check).await?;
    let report = stdout(&o);
    assert!(report.contains("no-cert (sidecar, namespace default) is getting its certificate"), "{report}");
    assert!(!report.contains("has no workload certificate"), "{report}");

    tokio::time::sleep((grace + Duration::from_secs(1)).saturating_sub(connected.elapsed())).await;
    let o = cp.plexus(&check).await?;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{report}");
    for needle in [
        "✗ proxy no-cert (sidecar, namespace default) has no workload certificate",
        "✗ proxy expired (sidecar, namespace default) holds an expired certificate",
        "✗ proxy stranger (sidecar, namespace default) holds a certificate from an unknown issuer",
        "✓ 1 of 4 proxies hold a valid certificate from the current issuer",
    ] {
        assert!(report.contains(needle), "{needle:?} in\n{report}");
    }
    drop((none, expired, stranger));
    plexus_testkit::eventually(Duration::from_secs(10), || async {
        let o = cp.plexus(&["check"]).await?;
        ensure!(o.status.success(), "{}", show(&o));
        Ok(())
    })
    .await?;
    drop(good);
    Ok(())
}
