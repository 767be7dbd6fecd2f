//! `plexus tap TARGET` (the live stream of requests) and `plexus top [TARGET]` (the busiest
//! paths, ranked), both reading the control plane's `/api/v1/tap`.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use bytes::BytesMut;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use plexus_core::tap::{TapEvent, TapFilter};

use crate::Failure;
use crate::api_client::ServerArgs;

/// Which requests to show; the same filters for `tap` and `top`.
#[derive(clap::Args, Clone, Debug)]
pub struct FilterArgs {
    /// Only this method.
    #[arg(long)]
    method: Option<String>,
    /// Only paths starting with this prefix.
    #[arg(long)]
    path: Option<String>,
    /// Only this status (503) or class (5xx).
    #[arg(long)]
    status: Option<String>,
    /// Only requests whose source workload, service or SPIFFE ID contains this.
    #[arg(long)]
    source: Option<String>,
    /// Only requests whose destination service, workload, SPIFFE ID or authority contains this.
    #[arg(long = "to")]
    destination: Option<String>,
    /// Only requests seen on this side of the proxies: inbound or outbound.
    #[arg(long, value_parser = ["inbound", "outbound"])]
    direction: Option<String>,
    /// Only proxies in this namespace.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Stop after this long (e.g. 10s); until interrupted when absent.
    #[arg(long)]
    duration: Option<String>,
}

#[derive(clap::Args)]
pub struct TapArgs {
    /// service/NAME (or just NAME), workload/NAME, namespace/NAME, or all.
    target: String,
    #[command(flatten)]
    filter: FilterArgs,
    /// Stop after this many requests.
    #[arg(long)]
    max: Option<u64>,
    /// text: one line per request; json: the events as JSON lines.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub struct TopArgs {
    /// service/NAME (or just NAME), workload/NAME, namespace/NAME, or all.
    #[arg(default_value = "all")]
    target: String,
    #[command(flatten)]
    filter: FilterArgs,
    /// How often the table is redrawn (on a terminal).
    #[arg(long, default_value = "1s")]
    interval: String,
    /// Rows shown.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[command(flatten)]
    server: ServerArgs,
}

fn parse_duration(flag: &str, v: &str) -> Result<Duration, Failure> {
    plexus_core::duration::parse(v).map_err(|e| Failure::usage(format!("{flag} {v:?}: {e}")))
}

impl FilterArgs {
    /// The `/api/v1/tap` path for `target`, validated here first so mistakes are usage errors.
    fn path(&self, target: &str, max: Option<u64>) -> Result<String, Failure> {
        plexus_core::tap::TapTarget::parse(target).map_err(Failure::usage)?;
        let mut pairs: Vec<(&str, String)> = vec![("target", target.to_string())];
        for (k, v) in [
            ("method", &self.method),
            ("path", &self.path),
            ("status", &self.status),
            ("source", &self.source),
            ("destination", &self.destination),
            ("direction", &self.direction),
        ] {
            if let Some(v) = v {
                pairs.push((k, v.clone()));
            }
        }
        TapFilter::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str()))).map_err(Failure::usage)?;
        if let Some(n) = &self.namespace {
            pairs.push(("namespace", n.clone()));
        }
        if let Some(m) = max {
            pairs.push(("max", m.to_string()));
        }
        let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
        Ok(format!("/api/v1/tap?{query}"))
    }

    fn duration(&self) -> Result<Option<Duration>, Failure> {
        self.duration.as_deref().map(|d| parse_duration("--duration", d)).transpose()
    }
}

/// Reads JSON lines from a tap stream, calling `each` per event, until the stream ends.
async fn read_events(body: Incoming, mut each: impl FnMut(TapEvent) -> bool) -> Result<(), Failure> {
    let mut body = body;
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::runtime(format!("the tap stream broke: {e}")))?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line = pending.split_to(end + 1);
            match serde_json::from_slice::<TapEvent>(&line) {
                Ok(e) => {
                    if !each(e) {
                        return Ok(());
                    }
                }
                Err(e) => tracing::debug!(error = %e, "skipping a tap line that is not an event"),
            }
        }
    }
    Ok(())
}

/// Runs `work` until it ends, `limit` passes or Ctrl-C.
async fn until_done(limit: Option<Duration>, work: impl Future<Output = Result<(), Failure>>) -> Result<(), Failure> {
    let limit = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = work => r,
        _ = limit => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

pub async fn tap(args: TapArgs) -> Result<(), Failure> {
    let path = args.filter.path(&args.target, args.max)?;
    let duration = args.filter.duration()?;
    let resp = args.server.stream(&path).await?;
    let proxies = resp.headers().get("x-plexus-tap-proxies").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
    eprintln!("tapping {} ({proxies} proxies now; more join as they connect); Ctrl-C to stop", args.target);
    let json = args.output == "json";
    let mut out = std::io::stdout().lock();
    until_done(
        duration,
        read_events(resp.into_body(), |e| {
            let line = if json { serde_json::to_string(&e).unwrap_or_default() } else { render(&e) };
            writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
        }),
    )
    .await
}

/// Who sent a request: its workload when known (outbound side), else its service account from
/// the mTLS identity (`sa/NAME`, what the inbound side knows), else `unknown`.
fn source_name(p: &plexus_core::tap::TapPeer) -> String {
    if !p.workload.is_empty() && p.workload != "unknown" {
        return p.workload.clone();
    }
    match p.principal.rsplit_once("/sa/") {
        Some((_, sa)) => format!("sa/{sa}"),
        None => "unknown".into(),
    }
}

/// One request on one line: when, where, what, outcome, then the decisions.
fn render(e: &TapEvent) -> String {
    let time = e.time.split_once('T').map_or(e.time.as_str(), |(_, t)| t.trim_end_matches('Z'));
    let dir = if e.direction == "inbound" { "in " } else { "out" };
    let dst = &e.destination;
    let to = match (dst.workload.as_str(), dst.endpoint.as_str()) {
        ("unknown" | "", "") => dst.service.clone(),
        ("unknown" | "", ep) => format!("{} ({ep})", dst.service),
        (w, "") => format!("{} [{w}]", dst.service),
        (w, ep) => format!("{} [{w} {ep}]", dst.service),
    };
    let status = match e.grpc_status {
        Some(g) => format!("{} grpc={g}", e.status),
        None => e.status.to_string(),
    };
    let mut line = format!(
        "{time} {dir} {} → {to} {} {}{} {status} {:.1}ms {} route={}",
        source_name(&e.source),
        e.method,
        e.authority,
        e.path,
        e.latency_ms,
        if e.tls { "mTLS" } else { "plaintext" },
        e.route,
    );
    if e.retries > 0 {
        line.push_str(&format!(" retries={}", e.retries));
    }
    if e.flags != "-" {
        line.push_str(&format!(" flags={}", e.flags));
    }
    if !e.decisions.is_empty() {
        line.push_str(" | ");
        line.push_str(&e.decisions.join("; "));
    }
    line
}

/// The busiest paths: requests grouped by source, destination, method and path.
#[derive(Default)]
struct Top {
    rows: HashMap<(String, String, String, String), Row>,
}

struct Row {
    count: u64,
    successes: u64,
    best_ms: f64,
    worst_ms: f64,
    last_ms: f64,
}

impl Top {
    fn add(&mut self, e: &TapEvent) {
        let key = (source_name(&e.source), e.destination.service.clone(), e.method.clone(), e.path.clone());
        let success = e.status < 500 && e.grpc_status.is_none_or(|g| g == 0);
        let row = self.rows.entry(key).or_insert(Row {
            count: 0,
            successes: 0,
            best_ms: f64::INFINITY,
            worst_ms: 0.0,
            last_ms: 0.0,
        });
        row.count += 1;
        row.successes += u64::from(success);
        row.best_ms = row.best_ms.min(e.latency_ms);
        row.worst_ms = row.worst_ms.max(e.latency_ms);
        row.last_ms = e.latency_ms;
    }

    /// The table, busiest first (ties by path, so the order is stable).
    fn render(&self, limit: usize) -> String {
        let mut rows: Vec<_> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
        let mut s = format!(
            "{:<22} {:<14} {:<7} {:<32} {:>7} {:>9} {:>9} {:>9} {:>8}\n",
            "SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "BEST", "WORST", "LAST", "SUCCESS"
        );
        for ((src, dst, method, path), r) in rows.into_iter().take(limit) {
            s.push_str(&format!(
                "{:<22} {:<14} {:<7} {:<32} {:>7} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}%\n",
                src,
                dst,
                method,
                path,
                r.count,
                r.best_ms,
                r.worst_ms,
                r.last_ms,
                r.successes as f64 * 100.0 / r.count as f64
            ));
        }
        s
    }
}

pub async fn top(args: TopArgs) -> Result<(), Failure> {
    let mut filter = args.filter.clone();
    // Each request passes two sidecars; counting it where it arrives counts it once.
    filter.direction.get_or_insert_with(|| "inbound".into());
    let path = filter.path(&args.target, None)?;
    let duration = filter.duration()?;
    let interval = parse_duration("--interval", &args.interval)?.max(Duration::from_millis(100));
    let resp = args.server.stream(&path).await?;
    let tty = std::io::stdout().is_terminal();
    let table = std::sync::Mutex::new(Top::default());
    let redraw = async {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            if let Ok(t) = table.lock() {
                // Clear the screen and draw from the top left.
                print!("\x1b[2J\x1b[H{}", t.render(args.limit));
                let _ = std::io::stdout().flush();
            }
        }
    };
    let read = read_events(resp.into_body(), |e| {
        if let Ok(mut t) = table.lock() {
            t.add(&e);
        }
        true
    });
    let work = async {
        if tty {
            tokio::select! {
                r = read => r,
                _ = redraw => Ok(()),
            }
        } else {
            read.await
        }
    };
    let result = until_done(duration, work).await;
    // Off a terminal (or once done), the final table once.
    if let Ok(t) = table.lock() {
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", t.render(args.limit));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, status: u16, ms: f64) -> TapEvent {
        serde_json::from_value(serde_json::json!({
            "time": "2026-01-01T10:00:00.123Z", "proxy": "reviews-v1", "direction": "inbound",
            "method": "GET", "authority": "reviews:9080", "path": path, "status": status,
            "latencyMs": ms, "source": {"workload": "productpage-v1"},
            "destination": {"service": "reviews", "workload": "reviews-v1", "endpoint": "127.0.0.1:1"},
            "route": "default", "tls": true, "flags": "-", "decisions": ["authorization: allowed by x"]
        }))
        .expect("event")
    }

    #[test]
    fn top_ranks_by_count() {
        let mut t = Top::default();
        for (p, n) in [("/a", 1), ("/b", 3), ("/c", 2)] {
            for i in 0..n {
                t.add(&event(p, if i == 0 { 500 } else { 200 }, 1.0 + i as f64));
            }
        }
        let table = t.render(10);
        let paths: Vec<&str> = table.lines().skip(1).filter_map(|l| l.split_whitespace().nth(3)).collect();
        assert_eq!(paths, ["/b", "/c", "/a"]);
        assert!(table.lines().nth(1).is_some_and(|l| l.trim_end().ends_with("66.7%")), "{table}");
    }

    #[test]
    fn a_tap_line_names_route_security_and_decisions() {
        let line = render(&event("/reviews/0", 200, 2.5));
        assert!(line.starts_with("10:00:00.123 in  productpage-v1 → reviews [reviews-v1 127.0.0.1:1]"), "{line}");
        assert!(line.contains("GET reviews:9080/reviews/0 200 2.5ms mTLS route=default"), "{line}");
        assert!(line.ends_with("| authorization: allowed by x"), "{line}");
    }
}
