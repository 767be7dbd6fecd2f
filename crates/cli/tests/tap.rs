//! `plexus tap` and `plexus top` on the Bookinfo demo: requests show up within a second with
//! their route, backend and authorization decision; denials name the policy; `top` ranks
//! paths by requests.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use plexus_core::tap::TapEvent;
use plexus_testkit::{Demo, Proc, TempDir};

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

/// A running `plexus tap -o json`, its events read on a thread.
struct Tap {
    _proc: Proc,
    events: mpsc::Receiver<(Instant, TapEvent)>,
}

impl Tap {
    fn start(demo: &Demo, args: &[&str]) -> Result<Tap> {
        let mut child = demo
            .command(&[&["tap"], args, &["-o", "json"]].concat())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(e) = serde_json::from_str::<TapEvent>(&line) {
                    let _ = tx.send((Instant::now(), e));
                }
            }
        });
        Ok(Tap { _proc: Proc(child), events })
    }

    /// The next event within `timeout`.
    fn next(&self, timeout: Duration) -> Result<(Instant, TapEvent)> {
        self.events.recv_timeout(timeout).context("no tap event")
    }
}

const DENY_DETAILS: &str = "\
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-details}
spec:
  targetRef: {kind: Service, name: details, port: 9080}
  action: deny
  rules:
  - from:
      serviceAccounts: [productpage]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_and_top_on_bookinfo() -> Result<()> {
    let dir = TempDir::new("tap")?;
    let demo = Demo::start(PLEXUS, &dir, &["--no-load"]).await?;

    // 1. A request shows up within a second, as the ingress and productpage saw it.
    // Under /static: a path the demo's HTTPRoute sends to productpage (other paths get 404 at
    // the gateway).
    let tap = Tap::start(&demo, &["workload/ingress-gateway", "--path", "/static/tap-probe-"])?;
    let mut sent = Vec::new();
    let (arrived, event) = loop {
        ensure!(sent.len() < 30, "no tap event after {} probes", sent.len());
        let path = format!("/static/tap-probe-{}", sent.len());
        sent.push(Instant::now());
        demo.get(&path).await?;
        if let Ok(got) = tap.next(Duration::from_millis(300)) {
            break got;
        }
    };
    let probe: usize = event.path.trim_start_matches("/static/tap-probe-").parse().context("probe number")?;
    let delay = arrived.duration_since(sent[probe]);
    ensure!(delay < Duration::from_secs(1), "tap showed {} after {delay:?}", event.path);
    ensure!(event.direction == "outbound" && event.destination.service == "productpage", "{event:?}");
    ensure!(event.decisions.iter().any(|d| d.contains("backend productpage")), "{event:?}");
    drop(tap);

    // 2. The route and backend productpage's sidecar chose, with mTLS to reviews.
    demo.apply(&dir, "route.yaml", include_str!("../../../examples/bookinfo/route-all-v1.yaml"))?;
    let tap = Tap::start(&demo, &["service/productpage", "--direction", "outbound", "--to", "reviews", "--max", "1"])?;
    let event = first_event(&demo, &tap).await?;
    ensure!(event.route == "default/reviews", "{event:?}");
    ensure!(event.destination.service == "reviews-v1" && event.destination.version == "v1", "{event:?}");
    ensure!(event.tls && event.status == 200, "{event:?}");
    ensure!(
        event.decisions.first().is_some_and(|d| d.starts_with("route default/reviews rule 0: backend reviews-v1")),
        "{event:?}"
    );
    drop(tap);

    // 3. A denial names its policy, on the destination's side.
    demo.apply(&dir, "deny.yaml", DENY_DETAILS)?;
    let tap = Tap::start(&demo, &["service/details", "--status", "403", "--max", "1"])?;
    let event = first_event(&demo, &tap).await?;
    ensure!(event.direction == "inbound" && event.status == 403, "{event:?}");
    ensure!(event.source.principal.ends_with("/sa/productpage"), "{event:?}");
    ensure!(event.decisions.iter().any(|d| d == "authorization: denied by default/no-details"), "{event:?}");
    let o = demo.cli(&["delete", "authorizationpolicy", "no-details"])?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(tap);

    // 4. `top` ranks paths by requests (counted once each, where they arrive).
    let top = demo
        .command(&["top", "service/productpage", "--duration", "6s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..9 {
        for (path, every) in [("/static/top-a", 1), ("/static/top-b", 3), ("/static/top-c", 9)] {
            // a: 9 requests, b: 3, c: 1 (interleaved, so ranking is by count, not order).
            if i % every == 0 {
                demo.get(path).await?;
            }
        }
    }
    let out = tokio::task::spawn_blocking(move || top.wait_with_output()).await??;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(out.status.success(), "top: {table}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<(String, u64)> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((cols.get(3)?.to_string(), cols.get(4)?.parse().ok()?))
        })
        .filter(|(path, _)| path.starts_with("/static/top-"))
        .collect();
    let want = [("/static/top-a".to_string(), 9), ("/static/top-b".to_string(), 3), ("/static/top-c".to_string(), 1)];
    ensure!(rows == want, "top ranked {rows:?}, want {want:?}:\n{table}");

    demo.stop().await
}

/// Fetches pages until `tap` shows an event (its proxies may still be joining at first).
async fn first_event(demo: &Demo, tap: &Tap) -> Result<TapEvent> {
    for _ in 0..30 {
        demo.get("/productpage").await?;
        if let Ok((_, e)) = tap.next(Duration::from_millis(300)) {
            return Ok(e);
        }
    }
    bail!("no tap event after 30 pages")
}
