//! [`Demo`]: a whole `plexus demo` (control plane, ingress, Bookinfo with sidecars) on free
//! ports with its own data dir, for end-to-end tests of what users see.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

use crate::{TempDir, free_port};

/// A child process killed (SIGKILL) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A running `plexus demo`; killed on drop. Its log (`demo.log`) and its workloads' logs
/// (`data/logs`) stay in the test's temp dir, which is kept when a test fails.
pub struct Demo {
    proc: Proc,
    bin: PathBuf,
    /// The data dir (tokens, store).
    pub data: PathBuf,
    /// The control plane's HTTP port.
    pub http: u16,
    /// The control plane's gRPC port.
    pub grpc: u16,
    pub ingress: SocketAddr,
    _stdout: std::io::Lines<BufReader<ChildStdout>>,
}

impl Demo {
    /// Starts `bin demo` with `extra_args` and waits for its "running" line (printed once
    /// Bookinfo answers through the ingress).
    pub async fn start(bin: impl AsRef<Path>, dir: &TempDir, extra_args: &[&str]) -> Result<Demo> {
        let bin = bin.as_ref().to_path_buf();
        let data = dir.join("data");
        let (http, grpc, ingress) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(&bin);
        cmd.args(["demo", "--http-addr", &format!("127.0.0.1:{http}"), "--grpc-addr", &format!("127.0.0.1:{grpc}")]);
        cmd.args(["--ingress-addr", &format!("127.0.0.1:{ingress}"), "--data-dir"]).arg(&data);
        cmd.args(extra_args);
        let log = std::fs::File::create(dir.join("demo.log"))?;
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::from(log)).spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let proc = Proc(child);
        let (first, lines) = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            (lines.next(), lines)
        })
        .await?;
        let log_tail = || {
            let log = std::fs::read_to_string(dir.join("demo.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            format!("demo log (tail):\n{}", lines[lines.len().saturating_sub(15)..].join("\n"))
        };
        let first = first.with_context(|| format!("demo printed nothing; {}", log_tail()))??;
        ensure!(first.starts_with("Plexus demo is running"), "{first}; {}", log_tail());
        let ingress = SocketAddr::from(([127, 0, 0, 1], ingress));
        Ok(Demo { proc, bin, data, http, grpc, ingress, _stdout: lines })
    }

    /// The control plane's HTTP address.
    pub fn api(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http))
    }

    /// `http://127.0.0.1:<http>`.
    pub fn server(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// Fetches pages until every reviews version has served one (the latency-aware balancer
    /// favours the fastest, so this can take a few pages).
    pub async fn every_version_answers(&self) -> Result<()> {
        let mut seen = BTreeSet::new();
        let started = Instant::now();
        while seen.len() < 3 {
            ensure!(started.elapsed() < Duration::from_secs(60), "only {seen:?} answered within 60 s");
            let page = self.get("/productpage").await?.text();
            seen.extend(page.lines().find_map(|l| l.trim().strip_prefix("Reviews served by: ").map(str::to_string)));
        }
        Ok(())
    }

    /// `GET path` through the ingress (HTTP/1.1, 15 s).
    pub async fn get(&self, path: &str) -> Result<crate::client::Collected> {
        crate::client::get(self.ingress, &self.ingress.to_string(), path, &[], Duration::from_secs(15))
            .await
            .with_context(|| format!("GET http://{}{path}", self.ingress))
    }

    /// A `plexus` command against this demo's control plane (not run yet).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("PLEXUS_SERVER", self.server()).env("PLEXUS_DATA_DIR", &self.data);
        c
    }

    /// Runs a `plexus` command against this demo's control plane.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(self.command(args).output()?)
    }

    /// `plexus apply` of a YAML text (written to `dir/name`).
    pub fn apply(&self, dir: &TempDir, name: &str, yaml: &str) -> Result<()> {
        let file = dir.join(name);
        std::fs::write(&file, yaml)?;
        let o = self.cli(&["apply", "-f", file.to_str().context("path")?])?;
        ensure!(o.status.success(), "apply {name}: {}", String::from_utf8_lossy(&o.stderr));
        Ok(())
    }

    /// `plexus run --service SERVICE --version VERSION --port APP_PORT` joined to this demo
    /// (the workload itself just sleeps; the app is served by the test).
    pub fn run_workload(&self, dir: &TempDir, service: &str, version: &str, app_port: u16) -> Result<Proc> {
        let log = std::fs::File::create(dir.join(format!("{service}-{version}.log")))?;
        let child = Command::new(&self.bin)
            .args(["run", "--service", service, "--version", version, "--port", &app_port.to_string()])
            .args(["--control-plane", &format!("http://127.0.0.1:{}", self.grpc)])
            .args(["--server", &self.server(), "--data-dir"])
            .arg(&self.data)
            .args(["--", "sleep", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        Ok(Proc(child))
    }

    /// SIGINT, then the demo must be gone within 10 s.
    pub async fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc_kill(self.proc.0.id() as i32, 2) };
        let stopping = Instant::now();
        while self.proc.0.try_wait()?.is_none() {
            ensure!(stopping.elapsed() < Duration::from_secs(10), "demo still running 10 s after SIGINT");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}
