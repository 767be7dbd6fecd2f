//! `plexus stat`: golden metrics per service, workload or route from the control plane's
//! rolling window of proxy reports.

use http::{Method, StatusCode};
use serde_json::Value;

use crate::Failure;
use crate::api_client::{ServerArgs, api_error};

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

fn ms(v: &Value) -> String {
    v.as_f64().map(|x| if x < 10.0 { format!("{x:.2}ms") } else { format!("{x:.0}ms") }).unwrap_or_else(|| "-".into())
}

pub async fn run(args: StatArgs) -> Result<(), Failure> {
    let path = format!("/api/v1/stat?kind={}&window={}", args.kind, args.window);
    let (status, mut answer) = args.server.call(Method::GET, &path, None, false).await?;
    if status != StatusCode::OK {
        return Err(api_error(status, &answer));
    }
    if let Some(name) = &args.name {
        let rows: Vec<Value> = answer["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["name"] == name.as_str())
            .collect();
        if rows.is_empty() {
            return Err(Failure::runtime(format!("no traffic for {} {name} in the last {}", args.kind, args.window)));
        }
        answer["rows"] = Value::Array(rows);
    }
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
        return Ok(());
    }
    println!("{:<28} {:>10} {:>9} {:>9} {:>9} {:>9} {:>6}", "NAME", "RPS", "SUCCESS", "P50", "P95", "P99", "MTLS");
    for r in answer["rows"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<28} {:>10.2} {:>8.2}% {:>9} {:>9} {:>9} {:>5.0}%",
            r["name"].as_str().unwrap_or("?"),
            r["requestsPerSecond"].as_f64().unwrap_or(0.0),
            r["successRate"].as_f64().unwrap_or(0.0) * 100.0,
            ms(&r["p50Ms"]),
            ms(&r["p95Ms"]),
            ms(&r["p99Ms"]),
            r["mtlsShare"].as_f64().unwrap_or(0.0) * 100.0,
        );
    }
    Ok(())
}
