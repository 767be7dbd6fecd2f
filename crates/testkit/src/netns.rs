//! Network namespaces for tests that need a pod-like topology (root only): two namespaces
//! joined by a veth pair, `a` (10.<net>.N.1) and `b` (10.<net>.N.2), deleted on drop.

use std::process::Command;

use anyhow::{Result, ensure};

/// Runs `args[0]` with the rest as arguments; an error carries its stderr.
pub fn sh(args: &[&str]) -> Result<()> {
    let (program, rest) = args.split_first().ok_or_else(|| anyhow::anyhow!("sh: empty command"))?;
    let out = Command::new(program).args(rest).output()?;
    ensure!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Two namespaces joined by a veth pair, deleted (with the pair) on drop.
pub struct NetnsPair {
    /// The first namespace's name (address `.1`).
    pub a: String,
    /// The second namespace's name (address `.2`).
    pub b: String,
    net: u8,
    subnet: u8,
}

impl NetnsPair {
    /// Creates `<tag>-a-<pid>` and `<tag>-b-<pid>` on `10.<net>.<subnet>.0/24`, the subnet
    /// derived from the process id. Each test file picks its own `tag` and `net` so that two
    /// files running at once do not collide.
    pub fn create(tag: &str, net: u8) -> Result<NetnsPair> {
        let id = std::process::id();
        // Interface names are at most 15 bytes; a pid has at most 7 digits.
        ensure!(tag.len() <= 7, "netns tag {tag:?} is longer than 7 bytes");
        let subnet = (id % 200) as u8 + 20;
        let n = NetnsPair { a: format!("{tag}-a-{id}"), b: format!("{tag}-b-{id}"), net, subnet };
        let (va, vb) = (format!("{tag}a{id}"), format!("{tag}b{id}"));
        sh(&["ip", "netns", "add", &n.a])?;
        sh(&["ip", "netns", "add", &n.b])?;
        sh(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        sh(&["ip", "link", "set", &va, "netns", &n.a])?;
        sh(&["ip", "link", "set", &vb, "netns", &n.b])?;
        for (ns, dev, host) in [(&n.a, &va, 1), (&n.b, &vb, 2)] {
            sh(&["ip", "-n", ns, "addr", "add", &format!("{}/24", n.ip(host)), "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn ip(&self, host: u8) -> String {
        format!("10.{}.{}.{host}", self.net, self.subnet)
    }

    /// The address of namespace `a`.
    pub fn client_ip(&self) -> String {
        self.ip(1)
    }

    /// The address of namespace `b`.
    pub fn server_ip(&self) -> String {
        self.ip(2)
    }

    /// Arguments for `ip` that run `cmd` inside namespace `ns`.
    pub fn exec<'a>(&'a self, ns: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["netns", "exec", ns];
        v.extend_from_slice(cmd);
        v
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}
