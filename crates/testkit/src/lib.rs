//! Test harness for Plexus end-to-end tests.
//!
//! Everything here binds to `127.0.0.1` on ephemeral ports, so tests can run in parallel
//! without stepping on each other.
//!
//! * [`Proxy`] runs a `plexus proxy` child process, waits for its ready line and `/ready`, and
//!   kills it on drop (its stderr is kept in a file and shown when a test panics).
//! * [`HttpEcho`], [`TcpEcho`] and [`ServerFirst`] are upstream applications served on the
//!   current tokio runtime.
//! * [`Resources`] writes `--resources` files.
//! * [`require_tool`], [`require_root`] and [`require_python_module`] implement the
//!   prerequisite rule: under `CI=true` a missing prerequisite fails the test (panic);
//!   elsewhere it prints `SKIPPED: <why>` and the caller returns early.
//! * [`Demo`] runs a whole `plexus demo` on free ports.
//! * [`Background`] runs helper processes (the Python peers) that print a ready line.
//! * [`metric_sum`] and [`metric_sample`] read samples out of a `/metrics` page.
//! * [`client`] has small HTTP client helpers built on hyper (no proxy env vars, no pooling).
//! * [`netns`] joins two network namespaces with a veth pair (root-only tests).
//!
//! Tests using this crate should run on a multi-thread runtime
//! (`#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`): upstream servers are
//! spawned onto the test's runtime.

use std::future::Future;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

mod background;
pub mod certs;
pub mod client;
mod demo;
mod metrics;
pub mod netns;
mod proxy;
mod resources;

pub use metrics::{metric_sample, metric_sum};
mod upstream;

pub use background::Background;
pub use demo::{Demo, Proc};
pub use proxy::{Proxy, ProxyAddrs};
pub use resources::{Resources, ServicePort, WorkloadSpec};
pub use upstream::{
    HttpEcho, SERVER_FIRST_GREETING, ServerFirst, TCP_ECHO_FINAL_LINE, TCP_ECHO_SERVER_BYE,
    TCP_ECHO_SERVER_CLOSES_FIRST, TcpEcho,
};

/// Re-exports so that test crates need no direct dependency on these.
pub use {bytes, http, http_body_util, hyper, hyper_util};

/// The loopback address every test listener binds to.
pub const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Environment variables that would make peers (curl, grpcio, websockets) go through some
/// other proxy; [`command`] removes them.
pub const PROXY_ENV_VARS: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "grpc_proxy",
    "no_proxy",
    "NO_PROXY",
];

/// `true` when the environment variable `CI` is `true` (or `1`): missing prerequisites fail.
pub fn is_ci() -> bool {
    matches!(std::env::var("CI").as_deref().map(str::to_ascii_lowercase).as_deref(), Ok("true") | Ok("1"))
}

/// Reports a missing prerequisite: panics under `CI=true`, otherwise prints
/// `SKIPPED: <why>` (straight to the process's stderr, so it shows even when the test
/// harness captures output) and returns `false`.
pub fn skip(why: &str) -> bool {
    if is_ci() {
        panic!("missing prerequisite (CI=true, so this fails instead of skipping): {why}");
    }
    let name = std::thread::current().name().unwrap_or("test").to_string();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "SKIPPED: {name}: {why}");
    println!("SKIPPED: {why}");
    false
}

/// Looks `name` up in `PATH` (or checks it directly when it contains a `/`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_exec(p))
}

/// `true` when the executable `name` is on `PATH`; otherwise [`skip`]s (panics under CI).
pub fn require_tool(name: &str) -> bool {
    if find_tool(name).is_some() {
        return true;
    }
    skip(&format!("`{name}` is not installed (not found in PATH)"))
}

/// `true` when running as root (effective uid 0); otherwise [`skip`]s (panics under CI).
pub fn require_root() -> bool {
    if effective_uid() == Some(0) {
        return true;
    }
    skip("this test needs root (effective uid 0)")
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `true` when `python3` is installed and can `import module`; otherwise [`skip`]s
/// (panics under CI). `package` is what to `pip install` (shown in the message).
pub fn require_python_module(module: &str, package: &str) -> bool {
    if !require_tool("python3") {
        return false;
    }
    let ok = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!("import {module}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    skip(&format!("python3 cannot `import {module}` (pip install {package})"))
}

/// A port that was free a moment ago on 127.0.0.1, chosen below the kernel's ephemeral range
/// (`ip_local_port_range`), so the ports the kernel hands out for `bind(0)` and outgoing
/// connections in the meantime cannot take it. Ports handed out by this process are not
/// handed out again.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 20_000 { (10_000u16, low) } else { (1_024, low.max(1_025)) };
    for _ in 0..500 {
        let port = fastrand::u16(from..to);
        let Ok(listener) = TcpListener::bind((LOCALHOST, port)) else {
            continue;
        };
        let Ok(addr) = listener.local_addr() else {
            continue;
        };
        let port = addr.port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("could not find a free TCP port on 127.0.0.1");
}

/// Polls `f` every 50 ms until it returns `Ok`, or fails with the last error after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match tokio::time::timeout(left.max(Duration::from_millis(1)), f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("attempt did not finish"),
        };
        if Instant::now() >= deadline {
            return Err(err.context(format!("condition not met within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    eventually(timeout, || async move {
        tokio::net::TcpStream::connect(addr).await.map(drop).with_context(|| format!("connect to {addr}"))
    })
    .await
}

/// A directory under [`std::env::temp_dir`] with a unique name, removed on drop — unless the
/// thread is panicking (it is kept, and its path printed, for diagnostics) or the env
/// variable `PLEXUS_KEEP_TMP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/plexus-<prefix>-<pid>-<n>-<nanos>`.
    pub fn new(prefix: &str) -> Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("plexus-{prefix}-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("PLEXUS_KEEP_TMP").is_some() {
            eprintln!("kept temp dir {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a test needs to itself, beyond its own free ports and temp dirs (which every test has:
/// those need no lock). Held with [`exclusive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// The CPU: the test's assertions depend on timing (latency, rates, throughput, "within
    /// a second") or it loads every core, so it must not overlap another such test.
    Cpu,
    /// The host's network configuration: the `plx0` bridge and `10.251.0.0/24` of
    /// `--netns` mode, and iptables rules outside a test's own network namespaces.
    HostNetwork,
}

impl Shared {
    fn name(self) -> &'static str {
        match self {
            Shared::Cpu => "cpu",
            Shared::HostNetwork => "host-network",
        }
    }
}

/// An exclusive hold on a [`Shared`] resource; released on drop (also when the test panics).
#[derive(Debug)]
pub struct Exclusive {
    _file: std::fs::File,
}

/// Holds `what` for the rest of the test (`let _cpu = exclusive(Shared::Cpu).await;`): waits
/// until no other test holds it. The lock is an advisory file lock
/// (`$TMPDIR/plexus-test-<what>.lock`), so it works across test binaries and processes — under
/// `cargo test` and under `cargo nextest run` (one process per test) alike — and across
/// concurrent runs on one machine. The kernel releases it if the process dies.
/// `.config/nextest.toml` also puts these tests in test groups, so nextest does not start
/// several only for them to wait here.
pub async fn exclusive(what: Shared) -> Exclusive {
    let path = std::env::temp_dir().join(format!("plexus-test-{}.lock", what.name()));
    match lock_file(path).await {
        Ok(file) => Exclusive { _file: file },
        Err(e) => panic!("cannot take the {} test lock: {e}", what.name()),
    }
}

/// An exclusive `flock` on `path` (created if missing), waited for off the async workers.
async fn lock_file(path: PathBuf) -> std::io::Result<std::fs::File> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        file.lock()?;
        Ok(file)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// `exclusive(Shared::Cpu)`: for a test whose assertions depend on timing or that loads every
/// core (see [`Shared::Cpu`]). A test that only needs its own ports and directories takes no
/// lock.
pub async fn serial() -> Exclusive {
    exclusive(Shared::Cpu).await
}

/// The directory holding the Python peers (`tests/peers` at the workspace root).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers")
}

/// A [`tokio::process::Command`] for `program` with the proxy-related environment variables
/// removed, stdin closed and `kill_on_drop` set.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    for var in PROXY_ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs `cmd` to completion, capturing stdout and stderr; kills it and fails after `timeout`.
pub async fn run(cmd: &mut tokio::process::Command, timeout: Duration) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let desc = format!("{:?}", cmd.as_std());
    let child = cmd.spawn().with_context(|| format!("spawn {desc}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("wait for {desc}")),
        Err(_) => bail!("{desc} did not finish within {timeout:?} (killed)"),
    }
}

/// Like [`run`], but fails unless the command exits 0; the error shows its stdout and stderr.
pub async fn run_ok(cmd: &mut tokio::process::Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{:?}", cmd.as_std());
    let out = run(cmd, timeout).await?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A workload token for `namespace`/`service_account` made by `plexus token create` (the
/// `plexus` binary `bin`) against the control plane at `server` (HTTP API URL) with the admin
/// token of `data_dir`: the last line of its output.
pub async fn workload_token(
    bin: impl AsRef<std::ffi::OsStr>,
    server: &str,
    data_dir: &Path,
    namespace: &str,
    service_account: &str,
) -> Result<String> {
    let mut cmd = command(bin);
    cmd.args(["token", "create", "--service-account", service_account, "--namespace", namespace])
        .env("PLEXUS_SERVER", server)
        .env("PLEXUS_DATA_DIR", data_dir);
    let out = run_ok(&mut cmd, Duration::from_secs(30)).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().last().context("no token printed")?.trim().to_string())
}

/// The resident set size of process `pid` in bytes (`VmRSS` in `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: u64 =
        line.split_whitespace().nth(1).context("malformed VmRSS line")?.parse().context("malformed VmRSS value")?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
    }

    #[test]
    fn finds_sh() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("definitely-not-a-tool-xyz").is_none());
    }

    #[test]
    fn temp_dir_is_removed() {
        let dir = TempDir::new("selftest").expect("temp dir");
        let p = dir.path().to_path_buf();
        assert!(p.is_dir());
        drop(dir);
        assert!(!p.exists());
    }

    #[test]
    fn rss_of_self() {
        assert!(rss_bytes(std::process::id()).expect("rss") > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_file_is_held_until_dropped() {
        let dir = TempDir::new("lock").expect("temp dir");
        let path = dir.join("test.lock");
        let first = lock_file(path.clone()).await.expect("first lock");
        let second = tokio::spawn(lock_file(path.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "a second holder got the lock while the first held it");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(10), second).await.expect("released on drop");
        second.expect("task").expect("second lock");
    }

    #[tokio::test]
    async fn eventually_retries() {
        let n = std::sync::Arc::new(AtomicU64::new(0));
        let v = eventually(Duration::from_secs(5), || {
            let n = n.clone();
            async move {
                if n.fetch_add(1, Ordering::SeqCst) < 2 {
                    bail!("not yet")
                }
                Ok(7)
            }
        })
        .await
        .expect("eventually");
        assert_eq!(v, 7);
        let err = eventually(Duration::from_millis(200), || async { bail!("never") as Result<()> })
            .await
            .expect_err("must time out");
        assert!(format!("{err:#}").contains("never"));
    }
}
