//! Long-running helper processes (e.g. the Python peers' servers).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::TempDir;

/// A child process that announced readiness with a line on stdout. Its stderr goes to a
/// file; it is killed on drop (and its stderr printed if the thread is panicking).
#[derive(Debug)]
pub struct Background {
    name: String,
    child: Child,
    ready_line: String,
    stderr_path: PathBuf,
    _dir: TempDir,
}

impl Background {
    /// Spawns `cmd` (use [`crate::command`] to build it) and waits up to `timeout` for a
    /// stdout line starting with `ready_prefix`; earlier lines are ignored.
    pub async fn start(name: &str, mut cmd: Command, ready_prefix: &str, timeout: Duration) -> Result<Background> {
        let dir = TempDir::new(name)?;
        let stderr_path = dir.join("stderr.log");
        let stderr =
            std::fs::File::create(&stderr_path).with_context(|| format!("create {}", stderr_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(stderr)).kill_on_drop(true);
        let desc = format!("{:?}", cmd.as_std());
        let mut child = cmd.spawn().with_context(|| format!("spawn {desc}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let wait = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.starts_with(ready_prefix) => return Ok(line),
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        return Err(anyhow!("stdout closed before a {ready_prefix:?} line"));
                    }
                    Err(e) => return Err(anyhow!("reading stdout: {e}")),
                }
            }
        };
        let result = match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("no {ready_prefix:?} line within {timeout:?}")),
        };
        match result {
            Ok(ready_line) => {
                // Keep draining stdout so the child never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(Background { name: name.to_string(), child, ready_line, stderr_path, _dir: dir })
            }
            Err(e) => {
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                Err(e.context(format!("{name}: {desc} (exit: {status:?})\n--- {name} stderr ---\n{stderr}")))
            }
        }
    }

    /// The ready line.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// The last whitespace-separated word of the ready line parsed as a port
    /// (`ready 41234` → 41234).
    pub fn ready_port(&self) -> Result<u16> {
        self.ready_line
            .split_whitespace()
            .last()
            .and_then(|w| w.parse().ok())
            .with_context(|| format!("{}: no port in ready line {:?}", self.name, self.ready_line))
    }

    /// The process id (`None` once reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Where stderr is written.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}\n--- end of {} stderr ---", self.name, self.stderr(), self.name);
        }
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_for_ready_line() {
        let mut cmd = crate::command("sh");
        cmd.args(["-c", "echo noise; echo 'ready 4242'; sleep 30"]);
        let bg = Background::start("sh", cmd, "ready", Duration::from_secs(5)).await.expect("start");
        assert_eq!(bg.ready_port().expect("port"), 4242);

        let mut cmd = crate::command("sh");
        cmd.args(["-c", "echo oops >&2; exit 1"]);
        let err = Background::start("sh", cmd, "ready", Duration::from_secs(5)).await.expect_err("must fail");
        assert!(format!("{err:#}").contains("oops"), "{err:#}");
    }
}
