//! `plexus identity init|show|rotate`: the mesh's certificate authority.
//!
//! `init` works offline on the data dir; `show` asks the control plane and falls back to the
//! data dir when it is down; `rotate` asks the running control plane (it must push the new
//! trust bundle to every proxy).

use std::path::{Path, PathBuf};

use http::{Method, StatusCode};
use plexus_control::api_types::{CertOrigin, CertSummary, IdentityStatus, Rotated};
use plexus_control::identity;
use serde_json::json;

use crate::Failure;
use crate::api_client::{ServerArgs, error_text, parse_answer};

#[derive(clap::Args)]
pub struct IdentityArgs {
    #[command(subcommand)]
    command: IdentityCommand,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Subcommand)]
enum IdentityCommand {
    /// Create a trust anchor and issuer in the data dir, or import your own (works offline).
    Init(InitArgs),
    /// Show the trust bundle, the issuer and each connected proxy's certificate.
    Show(ShowArgs),
    /// Rotate the issuer (or, with --anchor, the trust anchor too) without downtime.
    Rotate(RotateArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// Names the generated certificates. Workload identities use MeshConfig `trustDomain`.
    #[arg(long, default_value = plexus_core::names::DEFAULT_TRUST_DOMAIN, conflicts_with = "anchor_cert")]
    trust_domain: String,
    /// Bring your own CA: the trust anchor certificate (PEM). Its key stays with you.
    #[arg(long, requires_all = ["issuer_cert", "issuer_key"])]
    anchor_cert: Option<PathBuf>,
    /// The issuer certificate (PEM), a CA signed by the trust anchor.
    #[arg(long, requires_all = ["anchor_cert", "issuer_key"])]
    issuer_cert: Option<PathBuf>,
    /// The issuer's private key (unencrypted PKCS#8 PEM).
    #[arg(long, requires_all = ["anchor_cert", "issuer_cert"])]
    issuer_key: Option<PathBuf>,
    /// Replace the certificate authority already in the data dir. Certificates issued by the
    /// old one stop being trusted once proxies get the new bundle.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct ShowArgs {
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

#[derive(clap::Args)]
struct RotateArgs {
    /// Rotate the trust anchor too: the bundle holds the new and the old anchor until every
    /// proxy has a certificate from the new issuer.
    #[arg(long)]
    anchor: bool,
}

pub async fn run(args: IdentityArgs) -> Result<(), Failure> {
    match args.command {
        IdentityCommand::Init(init_args) => init(&args.server.data_dir, init_args),
        IdentityCommand::Show(show_args) => show(&args.server, &show_args).await,
        IdentityCommand::Rotate(rotate_args) => rotate(&args.server, &rotate_args).await,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))
}

/// A trust domain is a DNS name: dot-separated DNS-1123 labels.
fn is_trust_domain(s: &str) -> bool {
    s.len() <= 255 && s.split('.').all(plexus_control::certify::is_dns1123_label)
}

fn init(data_dir: &Path, args: InitArgs) -> Result<(), Failure> {
    if !is_trust_domain(&args.trust_domain) {
        return Err(Failure::usage(format!(
            "--trust-domain {:?}: expected a DNS name of lower-case letters, digits, '-' and '.'",
            args.trust_domain
        )));
    }
    let had_ca = identity::ca_present(data_dir);
    if had_ca && !args.force {
        let current = identity::chain_status(data_dir)
            .map(|c| format!(" (trust anchor {}, serial {})", c.trust_anchor.subject, c.trust_anchor.serial))
            .unwrap_or_default();
        return Err(Failure::runtime(format!(
            "{} already holds a certificate authority{current}\n  hint: pass --force to replace it; workload certificates it issued stop being trusted once proxies get the new trust bundle (to change it without downtime use `plexus identity rotate --anchor`)",
            data_dir.display()
        )));
    }
    // An imported CA is validated before anything is written.
    let imported = match (&args.anchor_cert, &args.issuer_cert, &args.issuer_key) {
        (Some(a), Some(i), Some(k)) => {
            let key = String::from_utf8(read(k)?)
                .map_err(|_| Failure::usage(format!("{}: not a PEM text file", k.display())))?;
            let ca = identity::ImportedCa::validate(&read(a)?, &read(i)?, &key).map_err(|e| {
                Failure::usage(format!(
                    "cannot import the certificate authority:\n  {}\n  files: --anchor-cert {} --issuer-cert {} --issuer-key {}",
                    e.replace('\n', "\n  "),
                    a.display(),
                    i.display(),
                    k.display()
                ))
            })?;
            Some(ca)
        }
        _ => None,
    };
    let data = plexus_control::datadir::DataDir::init(data_dir)
        .map_err(|e| Failure::runtime(format!("cannot initialise the data dir {}: {e}", data_dir.display())))?;
    let (anchor, issuer) = match imported {
        Some(ca) => {
            ca.write_into(&data.path).map_err(Failure::runtime)?;
            println!("imported the trust anchor and issuer into {}", data.path.display());
            (ca.anchor, ca.issuer)
        }
        None => {
            let (anchor, issuer) = identity::generate_into(&data.path, &args.trust_domain).map_err(Failure::runtime)?;
            println!(
                "created a trust anchor and issuer (ECDSA P-256) in {} for {}",
                data.path.display(),
                args.trust_domain
            );
            (anchor, issuer)
        }
    };
    for (role, c) in [("trust anchor", &anchor.summary), ("issuer", &issuer.summary)] {
        println!("  {role:<13} {}  serial {}  valid until {}  sha256 {}", c.subject, c.serial, c.not_after, c.sha256);
    }
    if issuer.summary.expires_in_seconds < 60 * 86_400 {
        println!("  ‼ the issuer expires within 60 days ({})", issuer.summary.not_after);
    }
    if had_ca {
        println!("a running control plane keeps its previous certificate authority until it restarts");
    }
    Ok(())
}

/// Formats rows as left-aligned columns.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = *w));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn days_left(cert: &CertSummary) -> String {
    match cert.expires_in_seconds {
        s if s <= 0 => "expired".into(),
        s => (s / 86_400).to_string(),
    }
}

fn cert_row(role: &str, c: &CertSummary) -> Vec<String> {
    vec![
        role.into(),
        c.subject.clone(),
        c.serial.clone(),
        c.not_before.clone(),
        c.not_after.clone(),
        days_left(c),
        c.sha256.clone(),
    ]
}

fn issued_by_text(origin: CertOrigin) -> &'static str {
    match origin {
        CertOrigin::Current => "current issuer",
        CertOrigin::PreviousIssuer => "previous issuer",
        CertOrigin::PreviousAnchor => "old anchor (rotating)",
        CertOrigin::Unknown => "unknown issuer",
        CertOrigin::None => "none",
    }
}

/// `-` for an empty cell.
fn cell(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

async fn show(server: &ServerArgs, args: &ShowArgs) -> Result<(), Failure> {
    const PATH: &str = "/api/v1/identity";
    let from_cp = match server.call(Method::GET, PATH, None, false).await {
        Ok((StatusCode::OK, v)) => parse_answer::<IdentityStatus>(PATH, v).map_err(|f| f.message),
        Ok((status, v)) => Err(format!("answered {status}: {}", error_text(status, &v))),
        Err(e) => Err(e.message.lines().next().unwrap_or_default().to_string()),
    };
    // What the control plane says, or the chain in the data dir and why the former is missing.
    let (chain, status, unreachable) = match from_cp {
        Ok(status) => (status.chain.clone(), Some(status), None),
        Err(why) => {
            let chain = identity::chain_status(&server.data_dir).map_err(|e| {
                Failure::runtime(format!(
                    "{e}\n  hint: the control plane is not reachable ({why}) and {} holds no certificate authority; run `plexus identity init` or start `plexus control`",
                    server.data_dir.display()
                ))
            })?;
            (chain, None, Some(why))
        }
    };
    if args.output == "json" {
        let mut v = match &status {
            Some(s) => serde_json::to_value(s),
            None => serde_json::to_value(&chain),
        }
        .map_err(|e| Failure::runtime(e.to_string()))?;
        let reach = json!({ "server": server.server, "reachable": status.is_some(), "error": unreachable });
        if let Some(o) = v.as_object_mut() {
            o.insert("controlPlane".into(), reach);
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    match &status {
        Some(_) => println!("certificate authority from the control plane at {}", server.server),
        None => println!(
            "certificate authority from the data dir {} (control plane unreachable)",
            server.data_dir.display()
        ),
    }
    let mut rows = Vec::new();
    for (i, anchor) in chain.trust_bundle.iter().enumerate() {
        rows.push(cert_row(if i == 0 { "trust anchor" } else { "previous anchor" }, anchor));
    }
    rows.push(cert_row("issuer", &chain.issuer));
    println!("{}", table(&["ROLE", "SUBJECT", "SERIAL", "NOT BEFORE", "NOT AFTER", "DAYS LEFT", "SHA-256"], &rows));
    println!();
    println!("issuer signed by the trust anchor: {}", if chain.issuer_signed_by_anchor { "yes" } else { "NO" });
    if !chain.anchor_key_in_data_dir {
        println!("trust anchor key: not in the data dir (imported CA)");
    }
    let Some(status) = status else {
        if chain.previous_trust_anchor.is_some() {
            println!("rotation: trust anchor rotation in progress (the control plane finishes it)");
        } else {
            println!("rotation: none in progress");
        }
        println!();
        println!(
            "proxy certificates: control plane unreachable at {} ({})",
            server.server,
            unreachable.unwrap_or_default()
        );
        return Ok(());
    };
    println!("trust domain: {}, workload certificate lifetime: {}", status.trust_domain, status.leaf_lifetime);
    match &status.rotation {
        Some(rotation) => println!(
            "rotation: trust anchor rotation in progress since {}: {} of {} connected proxies still on the old issuer; the previous anchor leaves the bundle once every connected proxy has a certificate from the new issuer",
            rotation.since,
            rotation.proxies_on_old_issuer,
            rotation.proxies_on_old_issuer + rotation.proxies_on_new_issuer,
        ),
        None => println!("rotation: none in progress"),
    }
    println!();
    if status.proxies.is_empty() {
        println!("proxy certificates: no proxy connected");
        return Ok(());
    }
    println!("proxy certificates");
    let rows: Vec<Vec<String>> = status
        .proxies
        .iter()
        .map(|p| {
            vec![
                cell(&p.workload),
                cell(&p.namespace),
                cell(&p.spiffe_id),
                cell(&p.serial),
                cell(p.not_after.as_deref().unwrap_or_default()),
                issued_by_text(p.issued_by).to_string(),
            ]
        })
        .collect();
    println!("{}", table(&["WORKLOAD", "NAMESPACE", "SPIFFE ID", "SERIAL", "NOT AFTER", "ISSUED BY"], &rows));
    Ok(())
}

async fn rotate(server: &ServerArgs, args: &RotateArgs) -> Result<(), Failure> {
    let body = json!({ "anchor": args.anchor });
    let answer: Rotated = server.fetch(Method::POST, "/api/v1/identity/rotate", Some(&body), true).await?;
    println!("{}", answer.message);
    let issuer = &answer.issuer;
    println!("  issuer        {}  serial {}  valid until {}", issuer.subject, issuer.serial, issuer.not_after);
    for (i, a) in answer.trust_bundle.iter().enumerate() {
        println!(
            "  {:<13} {}  serial {}  valid until {}",
            if i == 0 { "trust anchor" } else { "old anchor" },
            a.subject,
            a.serial,
            a.not_after
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22");
    }

    #[test]
    fn trust_domains() {
        assert!(is_trust_domain("plexus.local") && is_trust_domain("example.org"));
        assert!(!is_trust_domain("") && !is_trust_domain("Example.org") && !is_trust_domain("a..b"));
    }
}
