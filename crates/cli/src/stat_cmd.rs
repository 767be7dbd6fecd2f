//! `plexus stat`: golden metrics per service, workload or route from the control plane's
//! rolling window of proxy reports.

use http::Method;
use plexus_control::api_types::StatAnswer;

use crate::Failure;
use crate::api_client::ServerArgs;

#[derive(clap::Args)]
pub struct StatArgs {
    /// service (default), workload or route.
    #[arg(default_value = "service")]
    kind: String,
    /// Show only this one.
    name: Option<String>,
    /// How far back to look (at most 10m).
    #[arg(long, default_value = "1m")]
    window: String,
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    #[command(flatten)]
    server: ServerArgs,
}

fn ms(v: Option<f64>) -> String {
    v.map(|x| if x < 10.0 { format!("{x:.2}ms") } else { format!("{x:.0}ms") }).unwrap_or_else(|| "-".into())
}

pub async fn run(args: StatArgs) -> Result<(), Failure> {
    let path = format!("/api/v1/stat?kind={}&window={}", args.kind, args.window);
    let mut answer: StatAnswer = args.server.fetch(Method::GET, &path, None, false).await?;
    if let Some(name) = &args.name {
        answer.rows.retain(|r| &r.name == name);
        if answer.rows.is_empty() {
            return Err(Failure::runtime(format!("no traffic for {} {name} in the last {}", args.kind, args.window)));
        }
    }
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
        return Ok(());
    }
    println!("{:<28} {:>10} {:>9} {:>9} {:>9} {:>9} {:>6}", "NAME", "RPS", "SUCCESS", "P50", "P95", "P99", "MTLS");
    for r in &answer.rows {
        println!(
            "{:<28} {:>10.2} {:>8.2}% {:>9} {:>9} {:>9} {:>5.0}%",
            r.name,
            r.requests_per_second,
            r.success_rate * 100.0,
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.mtls_share * 100.0,
        );
    }
    Ok(())
}
