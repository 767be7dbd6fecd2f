//! Network namespaces for transparent interception on one machine (`plexus run --netns`,
//! `plexus demo --netns`), like a Kubernetes pod: the workload and its sidecar share a network
//! namespace whose TCP traffic iptables sends through the sidecar.
//!
//! Layout (documented in docs/ARCHITECTURE.md): a host bridge `plx0` with 10.251.0.1/24; each
//! workload namespace `plx-N` gets 10.251.0.N on a veth pair attached to the bridge (N in
//! 2..=254). Service names resolve through the namespace's hosts file
//! (`/etc/netns/plx-N/hosts`, which `ip netns exec` mounts on `/etc/hosts`) to virtual IPs in
//! 10.252.0.0/16 that the sidecar maps back to Services. The sidecar marks its own
//! connections with SO_MARK 0x504c so the rules let them through.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use crate::Failure;

/// The host bridge.
pub const BRIDGE: &str = "plx0";
/// The host's address on the bridge (the control plane listens here in netns mode).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
/// SO_MARK of the sidecar's own connections.
pub const MARK: &str = "0x504c";
const MARK_VALUE: u32 = 0x504c;
const PREFIX: &str = "plx-";

fn ip(args: &[&str]) -> Result<(), Failure> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Failure::runtime(format!("cannot run `ip`: {e} (install iproute2)")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Failure::runtime(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Fails with a clear message unless running as root.
pub fn require_root() -> Result<(), Failure> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::usage("--netns needs root (network namespaces and iptables)"));
    }
    Ok(())
}

/// Creates the host bridge if it does not exist.
pub fn ensure_bridge() -> Result<(), Failure> {
    let exists =
        Command::new("ip").args(["link", "show", BRIDGE]).output().map(|o| o.status.success()).unwrap_or(false);
    if !exists {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE])?;
    }
    ip(&["link", "set", BRIDGE, "up"])
}

/// Removes the host bridge once nothing is attached to it, waiting up to `wait` for the
/// kernel to finish removing deleted namespaces' links (it does so in the background). While
/// another `--netns` demo's namespaces are attached, the bridge stays.
pub async fn remove_bridge_if_unused(wait: std::time::Duration) {
    let until = tokio::time::Instant::now() + wait;
    loop {
        let attached = Command::new("ip").args(["-o", "link", "show", "master", BRIDGE]).output();
        let Ok(o) = attached else { return };
        if !o.status.success() {
            return; // No bridge.
        }
        if String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            if let Err(e) = ip(&["link", "del", BRIDGE]) {
                tracing::warn!(error = %e.message, "cannot remove the {BRIDGE} bridge");
            }
            return;
        }
        if tokio::time::Instant::now() >= until {
            tracing::info!("the {BRIDGE} bridge stays: links are still attached to it");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Removes every `plx-*` namespace (left by an earlier run that did not stop cleanly).
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(PREFIX)) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(name));
        }
    }
}

/// One workload's network namespace; deleted on drop.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    /// Claims the first free address and sets the namespace up with interception rules;
    /// connections to the control plane's gRPC port on the bridge are not intercepted.
    pub fn create(control_plane_port: u16) -> Result<Pod, Failure> {
        ensure_bridge()?;
        for n in 2..=254u8 {
            let name = format!("{PREFIX}{n}");
            // `ip netns add` fails when the name exists: that is the claim.
            if ip(&["netns", "add", &name]).is_err() {
                continue;
            }
            let pod = Pod { name, ip: Ipv4Addr::new(10, 251, 0, n) };
            pod.setup(n, control_plane_port)?;
            return Ok(pod);
        }
        Err(Failure::runtime("no free address in 10.251.0.0/24 for another network namespace"))
    }

    fn setup(&self, n: u8, control_plane_port: u16) -> Result<(), Failure> {
        let (host_end, pod_end) = (format!("vph{n}"), format!("vpn{n}"));
        let _ = Command::new("ip").args(["link", "del", &host_end]).output();
        ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &pod_end])?;
        ip(&["link", "set", &host_end, "master", BRIDGE, "up"])?;
        ip(&["link", "set", &pod_end, "netns", &self.name])?;
        let ns = self.name.as_str();
        ip(&["-n", ns, "addr", "add", &format!("{}/24", self.ip), "dev", &pod_end])?;
        ip(&["-n", ns, "link", "set", &pod_end, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &GATEWAY.to_string()])?;
        // Outbound: the sidecar's own (marked) and loopback traffic stay; all other TCP goes
        // to the sidecar's outbound port. Inbound: everything but the admin port goes to the
        // sidecar's inbound port. The same rules as a pod's (`plexus init`), by mark.
        crate::redirect::Redirect {
            owner: crate::redirect::ProxyOwner::Mark(MARK_VALUE),
            outbound_port: 7710,
            inbound_port: 7711,
            skip_inbound_ports: vec![7712],
            skip_outbound_ports: Vec::new(),
            skip_outbound_to: vec![(GATEWAY, control_plane_port)],
            dns_port: None,
        }
        .apply(Some(ns))?;
        self.write_hosts(&[])
    }

    /// Writes the namespace's hosts file: each Service (`name`, `namespace`) gets a virtual IP.
    /// Written in place so the file mounted on `/etc/hosts` sees the update.
    pub fn write_hosts(&self, services: &[(String, String)]) -> Result<(), Failure> {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).map_err(|e| Failure::runtime(format!("cannot create {}: {e}", dir.display())))?;
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        let mut sorted = services.to_vec();
        sorted.sort();
        for (i, (name, ns)) in sorted.iter().enumerate() {
            let vip = Ipv4Addr::new(10, 252, (i / 254) as u8, (i % 254) as u8 + 1);
            let short = if ns == "default" { format!(" {name}") } else { String::new() };
            text.push_str(&format!("{vip}{short} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.cluster.local\n"));
        }
        let path = dir.join("hosts");
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))?;
        f.write_all(text.as_bytes()).map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))
    }

    /// `ip netns exec <name>` followed by `cmd`.
    pub fn exec(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}
