//! Transparent interception: the iptables rules that send a workload's TCP traffic through
//! its sidecar. One mechanism for both places a workload shares its network namespace with a
//! sidecar: `plexus run --netns` (the namespace made here; the sidecar's own connections carry
//! a mark) and `plexus init` (a Kubernetes pod's init container; the proxy runs as its own UID).
//!
//! The rules live in two chains of the nat table, `PLEXUS_INBOUND` (jumped to from
//! PREROUTING) and `PLEXUS_OUTPUT` (from OUTPUT), written with one `iptables-restore
//! --noflush`: declaring a chain empties it, and a jump is added only when missing, so
//! applying the rules again replaces them instead of doubling them.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::Failure;

pub const INBOUND_CHAIN: &str = "PLEXUS_INBOUND";
pub const OUTPUT_CHAIN: &str = "PLEXUS_OUTPUT";

/// How the proxy's own outbound connections are told apart from the workload's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyOwner {
    /// The proxy runs as this UID (a pod's sidecar).
    Uid(u32),
    /// The proxy marks its sockets (SO_MARK; `plexus run --netns`, where both run as root).
    Mark(u32),
}

/// What to intercept and what to let through.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub owner: ProxyOwner,
    /// The sidecar's outbound listener: the workload's outbound TCP goes there.
    pub outbound_port: u16,
    /// The sidecar's inbound listener: TCP arriving at the workload goes there.
    pub inbound_port: u16,
    /// Inbound ports never redirected (the proxy's own: admin, ...; `--skip-inbound-ports`).
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports never redirected (`--skip-outbound-ports`).
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destinations never redirected (the control plane in netns mode).
    pub skip_outbound_to: Vec<(Ipv4Addr, u16)>,
    /// DNS (UDP and TCP port 53) of everyone but the proxy goes to this loopback port.
    pub dns_port: Option<u16>,
}

impl Redirect {
    /// The rule lines of both chains (`-A CHAIN ...`), in order.
    pub fn rules(&self) -> Vec<String> {
        let mut rules = Vec::new();
        let mut inbound = |spec: String| rules.push(format!("-A {INBOUND_CHAIN} {spec}"));
        for port in dedup(&self.skip_inbound_ports) {
            inbound(format!("-p tcp -m tcp --dport {port} -j RETURN"));
        }
        inbound(format!("-p tcp -j REDIRECT --to-ports {}", self.inbound_port));
        let owner = match self.owner {
            ProxyOwner::Uid(uid) => format!("-m owner --uid-owner {uid}"),
            ProxyOwner::Mark(mark) => format!("-m mark --mark {mark:#x}"),
        };
        let not_owner = match self.owner {
            ProxyOwner::Uid(uid) => format!("-m owner ! --uid-owner {uid}"),
            ProxyOwner::Mark(mark) => format!("-m mark ! --mark {mark:#x}"),
        };
        let mut output = |spec: String| rules.push(format!("-A {OUTPUT_CHAIN} {spec}"));
        if let Some(dns) = self.dns_port {
            for proto in ["udp", "tcp"] {
                output(format!("-p {proto} -m {proto} --dport 53 {not_owner} -j REDIRECT --to-ports {dns}"));
            }
        }
        output(format!("{owner} -j RETURN"));
        output("-d 127.0.0.0/8 -j RETURN".into());
        for (ip, port) in &self.skip_outbound_to {
            output(format!("-d {ip}/32 -p tcp -m tcp --dport {port} -j RETURN"));
        }
        for port in dedup(&self.skip_outbound_ports) {
            output(format!("-p tcp -m tcp --dport {port} -j RETURN"));
        }
        output(format!("-p tcp -j REDIRECT --to-ports {}", self.outbound_port));
        rules
    }

    /// The jumps into the chains (`-A BUILTIN ...`).
    fn jumps(&self) -> Vec<String> {
        let mut jumps = vec![format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}")];
        if self.dns_port.is_some() {
            jumps.push(format!("-A OUTPUT -p udp -j {OUTPUT_CHAIN}"));
        }
        jumps.push(format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"));
        jumps
    }

    /// The `iptables-restore --noflush` input that installs the rules into a nat table whose
    /// current rules are `existing` (`iptables-save -t nat` output; empty: a fresh table).
    pub fn restore_input(&self, existing: &str) -> String {
        let mut text = String::from("*nat\n");
        let _ = writeln!(text, ":{INBOUND_CHAIN} - [0:0]");
        let _ = writeln!(text, ":{OUTPUT_CHAIN} - [0:0]");
        for rule in self.rules() {
            let _ = writeln!(text, "{rule}");
        }
        for jump in self.jumps() {
            if !existing.lines().any(|l| l.trim() == jump) {
                let _ = writeln!(text, "{jump}");
            }
        }
        text.push_str("COMMIT\n");
        text
    }

    /// Installs the rules in the network namespace `netns` (`None`: this process's).
    pub fn apply(&self, netns: Option<&str>) -> Result<(), Failure> {
        let existing = run(netns, &["iptables-save", "-t", "nat"], None)?;
        let input = self.restore_input(&existing);
        run(netns, &["iptables-restore", "-w", "--noflush"], Some(&input))?;
        Ok(())
    }
}

fn dedup(ports: &[u16]) -> Vec<u16> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Runs `argv` (in `netns` through `ip netns exec`), feeding it `stdin`; its stdout.
fn run(netns: Option<&str>, argv: &[&str], stdin: Option<&str>) -> Result<String, Failure> {
    let mut full: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        full.extend(["ip", "netns", "exec", ns]);
    }
    full.extend_from_slice(argv);
    let shown = full.join(" ");
    let mut child = Command::new(full[0])
        .args(&full[1..])
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::runtime(format!("cannot run `{shown}`: {e} (is iptables installed?)")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|e| Failure::runtime(format!("`{shown}`: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| Failure::runtime(format!("`{shown}`: {e}")))?;
    if !out.status.success() {
        return Err(Failure::runtime(format!("`{shown}` failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Redirect {
        Redirect {
            owner: ProxyOwner::Uid(1337),
            outbound_port: 7710,
            inbound_port: 7711,
            skip_inbound_ports: vec![7712, 9090, 7712],
            skip_outbound_ports: vec![5432],
            skip_outbound_to: Vec::new(),
            dns_port: Some(7753),
        }
    }

    #[test]
    fn pod_rules_exempt_the_proxy_uid_and_skipped_ports() {
        let rules = pod().rules();
        assert_eq!(
            rules,
            vec![
                "-A PLEXUS_INBOUND -p tcp -m tcp --dport 7712 -j RETURN",
                "-A PLEXUS_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
                "-A PLEXUS_INBOUND -p tcp -j REDIRECT --to-ports 7711",
                "-A PLEXUS_OUTPUT -p udp -m udp --dport 53 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 7753",
                "-A PLEXUS_OUTPUT -p tcp -m tcp --dport 53 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 7753",
                "-A PLEXUS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A PLEXUS_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A PLEXUS_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
                "-A PLEXUS_OUTPUT -p tcp -j REDIRECT --to-ports 7710",
            ]
        );
    }

    #[test]
    fn jumps_are_added_only_when_missing() {
        let fresh = pod().restore_input("");
        assert!(fresh.contains("-A PREROUTING -p tcp -j PLEXUS_INBOUND\n"));
        assert!(fresh.contains("-A OUTPUT -p udp -j PLEXUS_OUTPUT\n"));
        let existing = "*nat\n-A PREROUTING -p tcp -j PLEXUS_INBOUND\n-A OUTPUT -p udp -j PLEXUS_OUTPUT\n\
                        -A OUTPUT -p tcp -j PLEXUS_OUTPUT\nCOMMIT\n";
        let again = pod().restore_input(existing);
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(!again.contains("-A OUTPUT "), "{again}");
        assert!(again.starts_with("*nat\n:PLEXUS_INBOUND - [0:0]\n:PLEXUS_OUTPUT - [0:0]\n"));
    }

    #[test]
    fn netns_rules_exempt_the_mark_and_the_control_plane() {
        let r = Redirect {
            owner: ProxyOwner::Mark(0x504c),
            skip_outbound_to: vec![(Ipv4Addr::new(10, 251, 0, 1), 7700)],
            skip_inbound_ports: vec![7712],
            skip_outbound_ports: Vec::new(),
            dns_port: None,
            ..pod()
        };
        let rules = r.rules();
        assert!(rules.contains(&"-A PLEXUS_OUTPUT -m mark --mark 0x504c -j RETURN".to_string()));
        assert!(rules.contains(&"-A PLEXUS_OUTPUT -d 10.251.0.1/32 -p tcp -m tcp --dport 7700 -j RETURN".to_string()));
        assert!(!rules.iter().any(|r| r.contains("--dport 53")));
        assert!(!r.restore_input("").contains("-p udp -j PLEXUS_OUTPUT"));
    }
}
