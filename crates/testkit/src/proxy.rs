//! Running `plexus proxy` as a child process.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::client::{self, Collected};
use crate::{PROXY_ENV_VARS, TempDir};

/// How long [`Proxy::start`] waits for the ready line, and then again for `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The addresses a proxy reports in its ready line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAddrs {
    /// Outbound listener (also an explicit HTTP proxy).
    pub outbound: SocketAddr,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// `--upstream` binds, keyed `name.namespace:port`.
    pub upstreams: BTreeMap<String, SocketAddr>,
}

impl ProxyAddrs {
    /// Parses the ready line:
    /// `{"outbound":"IP:P","inbound":"IP:P","admin":"IP:P","upstreams":{"svc.ns:port":"IP:P"}}`.
    pub fn parse(line: &str) -> Result<ProxyAddrs> {
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).with_context(|| format!("the ready line is not JSON: {line:?}"))?;
        let addr = |key: &str| -> Result<SocketAddr> {
            v.get(key)
                .and_then(|a| a.as_str())
                .with_context(|| format!("ready line has no string {key:?}: {line}"))?
                .parse()
                .with_context(|| format!("ready line {key:?} is not IP:PORT: {line}"))
        };
        let mut upstreams = BTreeMap::new();
        if let Some(map) = v.get("upstreams") {
            let map = map.as_object().with_context(|| format!("ready line \"upstreams\" is not an object: {line}"))?;
            for (k, a) in map {
                let a = a
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .with_context(|| format!("upstream {k:?} is not \"IP:PORT\": {line}"))?;
                upstreams.insert(k.clone(), a);
            }
        }
        Ok(ProxyAddrs { outbound: addr("outbound")?, inbound: addr("inbound")?, admin: addr("admin")?, upstreams })
    }
}

/// A running `plexus proxy` (or any plexus command that prints the same ready line).
///
/// Its stdout's first line is parsed as the ready line; its stderr goes to a file (see
/// [`Proxy::stderr`]), whose tail is printed when the owning thread panics. Dropping it kills
/// the process.
#[derive(Debug)]
pub struct Proxy {
    name: String,
    child: Mutex<Child>,
    pid: u32,
    addrs: ProxyAddrs,
    stderr_path: PathBuf,
    extra_stdout: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Proxy {
    /// Runs `bin args...`, waits (up to 20 s) for the ready line, then until admin `/ready`
    /// answers 200 (up to 20 s more).
    pub async fn start<I, S>(bin: impl AsRef<Path>, args: I) -> Result<Proxy>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proxy::start_named("proxy", bin, args).await
    }

    /// Like [`Proxy::start`], with a name used in diagnostics (e.g. `client-sidecar`).
    pub async fn start_named<I, S>(name: &str, bin: impl AsRef<Path>, args: I) -> Result<Proxy>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let proxy = Proxy::spawn_named(name, bin, args).await?;
        proxy.wait_ready(READY_TIMEOUT).await?;
        Ok(proxy)
    }

    /// Starts an ingress gateway: `bin proxy --mode ingress --gateway GATEWAY --resources FILE`
    /// with `extra` (e.g. `--tls-dir`), its outbound, inbound and admin ports chosen by the
    /// system unless `extra` names them; ready once admin `/ready` answers and every listener
    /// port in `ports` accepts connections.
    pub async fn start_gateway(
        bin: impl AsRef<Path>,
        gateway: &str,
        resources: &Path,
        extra: &[&str],
        ports: &[u16],
    ) -> Result<Proxy> {
        let file = resources.to_str().context("resources path is not UTF-8")?;
        let mut args = vec!["proxy", "--mode", "ingress", "--gateway", gateway, "--resources", file];
        for flag in ["--outbound-port", "--inbound-port", "--admin-port"] {
            if !extra.contains(&flag) {
                args.extend([flag, "0"]);
            }
        }
        args.extend_from_slice(extra);
        let proxy = Proxy::start_named(gateway, bin, args).await?;
        for &port in ports {
            crate::wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), READY_TIMEOUT)
                .await
                .with_context(|| format!("gateway port {port}: {}", proxy.stderr_tail(2000)))?;
        }
        Ok(proxy)
    }

    /// Runs `bin args...` and waits (up to 20 s) for the ready line only.
    pub async fn spawn_named<I, S>(name: &str, bin: impl AsRef<Path>, args: I) -> Result<Proxy>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let bin = bin.as_ref();
        let dir = TempDir::new(name)?;
        let stderr_path = dir.join("stderr.log");
        let stderr =
            std::fs::File::create(&stderr_path).with_context(|| format!("create {}", stderr_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(stderr)).env("NO_COLOR", "1");
        for var in PROXY_ENV_VARS {
            cmd.env_remove(var);
        }
        let desc = format!("{cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("spawn {desc}"))?;
        let stdout = child.stdout.take().context("child stdout")?;

        // A thread reads stdout: the first line goes to `tx`, later lines are kept.
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<String>>();
        let extra_stdout = Arc::new(Mutex::new(Vec::new()));
        let extra = extra_stdout.clone();
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                let mut lines = std::io::BufReader::new(stdout).lines();
                let first = match lines.next() {
                    Some(Ok(line)) => Ok(line),
                    Some(Err(e)) => Err(anyhow!("reading stdout: {e}")),
                    None => Err(anyhow!("stdout closed before the ready line")),
                };
                let _ = tx.send(first);
                for line in lines.map_while(|l| l.ok()) {
                    extra.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            })
            .context("spawn stdout reader thread")?;

        let pid = child.id();
        let mut proxy = Proxy {
            name: name.to_string(),
            child: Mutex::new(child),
            pid,
            addrs: ProxyAddrs {
                outbound: ([0, 0, 0, 0], 0).into(),
                inbound: ([0, 0, 0, 0], 0).into(),
                admin: ([0, 0, 0, 0], 0).into(),
                upstreams: BTreeMap::new(),
            },
            stderr_path,
            extra_stdout,
            _dir: dir,
        };
        let line = match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(Ok(line))) => line,
            Ok(Ok(Err(e))) => return Err(proxy.failure(&format!("{desc}: {e}"))),
            Ok(Err(_)) => return Err(proxy.failure(&format!("{desc}: stdout reader died"))),
            Err(_) => {
                return Err(proxy.failure(&format!("{desc}: no ready line on stdout within {READY_TIMEOUT:?}")));
            }
        };
        match ProxyAddrs::parse(&line) {
            Ok(addrs) => proxy.addrs = addrs,
            Err(e) => return Err(proxy.failure(&format!("{desc}: {e:#}"))),
        }
        Ok(proxy)
    }

    /// Kills the process and builds an error carrying its exit status and stderr.
    fn failure(&self, what: &str) -> anyhow::Error {
        // Give a crashing process a moment to finish writing and exit.
        std::thread::sleep(Duration::from_millis(100));
        let status = self.exit_status();
        self.kill();
        anyhow!(
            "{} ({what}); exit status: {}\n--- {} stderr ---\n{}",
            self.name,
            status.map(|s| s.to_string()).unwrap_or_else(|| "still running (killed)".into()),
            self.name,
            self.stderr_tail(8000)
        )
    }

    /// Polls `GET /ready` on the admin port until it answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                bail!(
                    "{} exited ({status}) before /ready answered 200\n--- stderr ---\n{}",
                    self.name,
                    self.stderr_tail(8000)
                );
            }
            match self.admin_get("/ready").await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("{} {}", r.status, r.text().trim()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{}: admin /ready did not answer 200 within {timeout:?} (last: {last})\n--- stderr ---\n{}",
            self.name,
            self.stderr_tail(8000)
        )
    }

    /// `GET path` on the admin port.
    pub async fn admin_get(&self, path: &str) -> Result<Collected> {
        client::get(self.addrs.admin, &self.addrs.admin.to_string(), path, &[], Duration::from_secs(5)).await
    }

    /// The value of an unlabelled sample (`name value`) on the admin port's `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.admin_get("/metrics").await?.text();
        crate::metric_sample(&text, name).with_context(|| format!("no sample {name} in /metrics"))
    }

    /// `POST path` (empty body) on the admin port, e.g. `/shutdown`.
    pub async fn admin_post(&self, path: &str) -> Result<Collected> {
        client::post(
            self.addrs.admin,
            client::Version::Http1,
            &self.addrs.admin.to_string(),
            path,
            bytes::Bytes::new(),
            Duration::from_secs(5),
        )
        .await
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All addresses from the ready line.
    pub fn addrs(&self) -> &ProxyAddrs {
        &self.addrs
    }

    /// The outbound listener.
    pub fn outbound(&self) -> SocketAddr {
        self.addrs.outbound
    }

    /// The inbound listener.
    pub fn inbound(&self) -> SocketAddr {
        self.addrs.inbound
    }

    /// The admin listener.
    pub fn admin(&self) -> SocketAddr {
        self.addrs.admin
    }

    /// The local bind of `--upstream`, by key `name.namespace:port` (e.g. `echo.default:8080`).
    pub fn upstream(&self, key: &str) -> Result<SocketAddr> {
        self.addrs.upstreams.get(key).copied().with_context(|| {
            format!(
                "{}: no upstream {key:?} in the ready line (has: {:?})",
                self.name,
                self.addrs.upstreams.keys().collect::<Vec<_>>()
            )
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Current resident set size in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        crate::rss_bytes(self.pid())
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself (e.g. after `/shutdown`).
    pub async fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGKILL and reaps the process (idempotent).
    pub fn kill(&self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where stderr is written.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `max` bytes (about) of stderr.
    pub fn stderr_tail(&self, max: usize) -> String {
        let s = self.stderr();
        if s.len() <= max {
            return s;
        }
        let mut start = s.len() - max;
        while !s.is_char_boundary(start) {
            start += 1;
        }
        format!("[...]{}", &s[start..])
    }

    /// Lines the process printed on stdout after the ready line.
    pub fn extra_stdout(&self) -> Vec<String> {
        self.extra_stdout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}, {:?}) stderr tail ---\n{}\n--- end of {} stderr ---",
                self.name,
                self.pid,
                self.addrs,
                self.stderr_tail(6000),
                self.name
            );
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_line() {
        let a = ProxyAddrs::parse(
            r#"{"outbound":"127.0.0.1:1","inbound":"127.0.0.1:2","admin":"127.0.0.1:3","upstreams":{"echo.default:8080":"127.0.0.1:4"}}"#,
        )
        .expect("parse");
        assert_eq!(a.admin.port(), 3);
        assert_eq!(a.upstreams["echo.default:8080"].port(), 4);
        assert!(ProxyAddrs::parse("listening on 7710").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_a_process_that_exits_early() {
        let err = Proxy::start("sh", ["-c", "echo boom >&2; exit 3"]).await.expect_err("must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains("before the ready line"), "{msg}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejects_a_bad_ready_line() {
        let err = Proxy::start("sh", ["-c", "echo hello; sleep 30"]).await.expect_err("must fail");
        assert!(format!("{err:#}").contains("not JSON"), "{err:#}");
    }
}
