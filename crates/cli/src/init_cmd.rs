//! `plexus init`: the init container of an injected pod (SPEC §11). Installs, in the pod's
//! network namespace, the iptables rules that send the pod's TCP through its sidecar and its
//! DNS to the sidecar's DNS server — the rules `plexus run --netns` uses ([`crate::redirect`]),
//! with the proxy told apart by its UID.

use crate::Failure;
use crate::redirect::{ProxyOwner, Redirect};

#[derive(clap::Args)]
pub struct InitArgs {
    /// The UID the proxy runs as: its own connections are not redirected.
    #[arg(long, env = "PLEXUS_PROXY_UID", default_value_t = 1337)]
    proxy_uid: u32,
    /// The proxy's outbound listener (the pod's outbound TCP goes there).
    #[arg(long, default_value_t = 7710)]
    outbound_port: u16,
    /// The proxy's inbound listener (TCP arriving at the pod goes there).
    #[arg(long, default_value_t = 7711)]
    inbound_port: u16,
    /// The proxy's admin port (reached directly: probes, Prometheus, the control plane).
    #[arg(long, default_value_t = 7712)]
    admin_port: u16,
    /// The proxy's DNS port on 127.0.0.1: the pod's DNS (UDP and TCP port 53) goes there.
    #[arg(long, default_value_t = 7753, conflicts_with = "no_dns")]
    dns_port: u16,
    /// Leave the pod's DNS alone.
    #[arg(long)]
    no_dns: bool,
    /// Inbound ports not redirected (comma-separated).
    #[arg(long, env = "PLEXUS_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports not redirected (comma-separated).
    #[arg(long, env = "PLEXUS_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    skip_outbound_ports: Vec<u16>,
    /// Print the rules (`iptables-restore --noflush` input) instead of installing them.
    #[arg(long)]
    dry_run: bool,
}

impl InitArgs {
    fn redirect(&self) -> Redirect {
        let mut skip_inbound = vec![self.outbound_port, self.inbound_port, self.admin_port];
        skip_inbound.extend(&self.skip_inbound_ports);
        Redirect {
            owner: ProxyOwner::Uid(self.proxy_uid),
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            skip_inbound_ports: skip_inbound,
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_to: Vec::new(),
            dns_port: (!self.no_dns).then_some(self.dns_port),
        }
    }
}

pub async fn run(args: InitArgs) -> Result<(), Failure> {
    let redirect = args.redirect();
    if args.dry_run {
        print!("{}", redirect.restore_input(""));
        return Ok(());
    }
    redirect.apply(None)?;
    for rule in redirect.rules() {
        println!("{rule}");
    }
    eprintln!("plexus init: traffic redirect installed");
    Ok(())
}
