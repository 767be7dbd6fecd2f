//! `plexus token create|list|revoke`: workload tokens, each bound to one identity (see
//! `plexus_control::tokens`). Every subcommand needs the admin token (read from `--data-dir`).

use std::path::PathBuf;

use http::Method;
use serde_json::json;

use crate::Failure;
use crate::api_client::{ServerArgs, api_error, parse_answer};
use plexus_control::api_types::{TokenCreated, TokenList, TokenRevoked};

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Subcommand)]
enum TokenCommand {
    /// Create a workload token for spiffe://<td>/ns/NAMESPACE/sa/SERVICE_ACCOUNT: prints the
    /// trust anchor's SHA-256 fingerprint, then the token on its own last line.
    Create(CreateArgs),
    /// List tokens: ids, identities, expiry (never the secrets).
    List(ListArgs),
    /// Revoke a token: it bootstraps nothing more, and the certificates it bootstrapped are
    /// no longer renewed.
    Revoke(RevokeArgs),
}

#[derive(clap::Args)]
struct CreateArgs {
    #[arg(long)]
    service_account: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// How long the token can bootstrap a proxy (e.g. 1h, 24h).
    #[arg(long, default_value = "24h")]
    ttl: String,
    /// Also write the trust anchor (PEM) to this file (mode 0600), for `--anchor`.
    #[arg(long)]
    anchor_out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ListArgs {
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
    output: String,
}

#[derive(clap::Args)]
struct RevokeArgs {
    id: String,
}

pub async fn run(args: TokenArgs) -> Result<(), Failure> {
    let server = &args.server;
    match args.command {
        TokenCommand::Create(c) => {
            plexus_core::duration::parse(&c.ttl).map_err(|e| Failure::usage(format!("--ttl: {e}")))?;
            let body = json!({"serviceAccount": c.service_account, "namespace": c.namespace, "ttl": c.ttl});
            let created: TokenCreated = server.fetch(Method::POST, "/api/v1/tokens", Some(&body), true).await?;
            if let Some(path) = &c.anchor_out {
                write_private(path, created.anchor_pem.as_bytes())
                    .map_err(|e| Failure::runtime(format!("--anchor-out {}: {e}", path.display())))?;
            }
            let t = &created.token;
            eprintln!("token {} for {} (expires {})", t.id, t.identity, rfc3339(Some(t.expires_unix)));
            println!("trust anchor sha256: {}", t.anchor_sha256);
            println!("{}", t.token);
            Ok(())
        }
        TokenCommand::List(l) => {
            let (status, v) = server.call(Method::GET, "/api/v1/tokens", None, true).await?;
            if !status.is_success() {
                return Err(api_error(status, &v));
            }
            if l.output != "table" {
                return crate::routes_cmd::print_structured(&l.output, &v);
            }
            let list: TokenList = parse_answer("/api/v1/tokens", v)?;
            println!("{:<18} {:<9} {:<22} IDENTITY", "ID", "STATE", "EXPIRES");
            for t in list.items {
                println!("{:<18} {:<9} {:<22} {}", t.id, t.state, rfc3339(Some(t.expires_unix)), t.identity);
            }
            Ok(())
        }
        TokenCommand::Revoke(r) => {
            let path = format!("/api/v1/tokens/{}", r.id);
            let revoked: TokenRevoked = server.fetch(Method::DELETE, &path, None, true).await?;
            println!("token {} revoked", revoked.revoked);
            Ok(())
        }
    }
}

/// Creates a workload token for `namespace`/`service_account` with the admin token of
/// `server.data_dir` (what `plexus run` does when given none); 7 days, so a workload restarted
/// within a week can bootstrap again.
pub async fn create_for(server: &ServerArgs, namespace: &str, service_account: &str) -> Result<String, Failure> {
    let body = json!({"serviceAccount": service_account, "namespace": namespace, "ttl": "168h"});
    let created: TokenCreated = server.fetch(Method::POST, "/api/v1/tokens", Some(&body), true).await?;
    Ok(created.token.token)
}

fn rfc3339(unix: Option<i64>) -> String {
    match unix.and_then(|u| u64::try_from(u).ok()) {
        Some(u) => plexus_core::time::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u)),
        None => "-".into(),
    }
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}
