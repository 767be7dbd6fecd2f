//! `plexus-proxy`: the data plane alone — the same proxy, flags and environment variables as
//! `plexus proxy`, in a binary without the control plane, dashboard, CLI and load generator.
//! Its code is about half of `plexus`'s, so an idle sidecar maps fewer of the binary's pages
//! (docs/PERFORMANCE.md, "A binary for sidecars").

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use plexus_cli::proxy_cmd::{self, ProxyCli};
use plexus_cli::{exit_code, logging, runtime};

fn main() -> ExitCode {
    let matches = ProxyCli::command().name("plexus-proxy").bin_name("plexus-proxy").get_matches();
    let cli = match ProxyCli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    logging::init(&cli.log_format);
    let result = runtime(cli.args.worker_threads()).and_then(|rt| rt.block_on(proxy_cmd::run(cli.args)));
    exit_code(result)
}
