//! The web dashboard (SPEC §7) on a running `plexus demo`:
//!
//! * its pages and assets as the control plane serves them, and the read-only views behind
//!   them (`/api/v1/findings`, `/api/v1/overview`, `/api/v1/stat/series`), over HTTP;
//! * the pages in headless Chromium (Debian's `chromium`, driven by `playwright-core` from
//!   `tests/dashboard/check.mjs`): every page loads with no console error and no request off
//!   127.0.0.1, the topology's numbers match `/api/v1/graph`, it follows new traffic without a
//!   reload, a route applied with the CLI shows up, a 50-service graph has no overlapping
//!   labels, every page fits a 400 px window; screenshots are kept;
//! * the topology layout on its own (`node --test tests/dashboard/layout.test.mjs`).
//!
//! Chromium, Node and `tests/dashboard/node_modules` come from `scripts/install-test-deps`;
//! without them these tests skip, and fail under `CI=true`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use plexus_testkit::client::{get_api as get, get_api_json as get_json};
use plexus_testkit::{Demo, TempDir, command, eventually, find_tool, require_tool, run, skip};
use serde_json::Value;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

/// How long the browser script may take (it takes about two minutes on a loaded 2-core box).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(480);

fn repo() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&root).unwrap_or(root)
}

fn scripts() -> PathBuf {
    repo().join("tests/dashboard")
}

/// Where screenshots go: `$PLEXUS_SCREENSHOTS`, else `target/dashboard-screenshots`.
fn screenshots() -> PathBuf {
    if let Some(dir) = std::env::var_os("PLEXUS_SCREENSHOTS") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    target.join("dashboard-screenshots")
}

/// The browser, Node and playwright-core, or `None` after [`skip`] (which panics under CI).
fn browser() -> Option<PathBuf> {
    if !require_tool("node") {
        return None;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let Some(chromium) = find_tool(&chromium) else {
        skip(&format!("{chromium} is not installed (apt-get install chromium; see scripts/install-test-deps)"));
        return None;
    };
    if !scripts().join("node_modules/playwright-core/package.json").is_file() {
        skip(
            "tests/dashboard/node_modules is missing (npm ci --prefix tests/dashboard; see scripts/install-test-deps)",
        );
        return None;
    }
    Some(chromium)
}

/// Waits until the graph shows every Bookinfo hop with some seconds of traffic behind it, so
/// the browser compares steady numbers.
async fn steady_graph(demo: &Demo) -> Result<()> {
    let api = demo.api();
    eventually(Duration::from_secs(90), || async move {
        let g = get_json(api, "/api/v1/graph?window=1m").await?;
        let edges = g["edges"].as_array().context("edges")?;
        let has = |s: &str, t: &str| {
            edges.iter().any(|e| {
                e["source"].as_str().is_some_and(|x| x.contains(s))
                    && e["target"].as_str().is_some_and(|x| x.contains(t))
            })
        };
        for (s, t) in [
            ("ingress-gateway", "productpage"),
            ("productpage", "details"),
            ("productpage", "reviews/v1"),
            ("productpage", "reviews/v2"),
            ("productpage", "reviews/v3"),
            ("reviews/v2", "ratings"),
            ("reviews/v3", "ratings"),
        ] {
            ensure!(has(s, t), "no edge {s} -> {t} yet");
        }
        let pages = edges
            .iter()
            .find(|e| e["source"].as_str().is_some_and(|x| x.contains("ingress-gateway")))
            .and_then(|e| e["requests"].as_u64())
            .unwrap_or(0);
        ensure!(pages >= 60, "{pages} pages reported so far");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_in_headless_chromium() -> Result<()> {
    let Some(chromium) = browser() else { return Ok(()) };
    let dir = TempDir::new("dashboard")?;
    let demo = Demo::start(PLEXUS, &dir, &[]).await?;
    demo.every_version_answers().await?;
    steady_graph(&demo).await?;

    let shots = screenshots();
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots)?;
    let mut node = command("node");
    node.arg("check.mjs")
        .current_dir(scripts())
        .env("PLEXUS_DASHBOARD", demo.server())
        .env("PLEXUS_INGRESS", format!("http://{}", demo.ingress))
        .env("PLEXUS_BIN", PLEXUS)
        .env("PLEXUS_DATA_DIR", &demo.data)
        .env("PLEXUS_EXAMPLES", repo().join("examples/bookinfo"))
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium);
    let out = run(&mut node, BROWSER_TIMEOUT).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let shown: Vec<String> = std::fs::read_dir(&shots)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".png"))
        .collect();
    println!("{} screenshots in {}", shown.len(), shots.display());
    ensure!(out.status.success(), "the browser checks failed ({}); see above and {}", out.status, shots.display());
    ensure!(stdout.contains(" passed, 0 failed"), "no summary line from check.mjs");
    for page in
        ["overview", "topology", "services", "workloads", "routes", "policies", "tap", "certificates", "performance"]
    {
        for name in [format!("{page}.png"), format!("narrow-{page}.png")] {
            ensure!(shown.contains(&name), "no screenshot {name} in {}", shots.display());
        }
    }
    ensure!(shown.iter().any(|n| n == "topology-50-services.png"), "no screenshot of the 50-service graph");
    demo.stop().await
}

/// The pages and assets as served, and the views the pages read, over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_assets_and_views_api() -> Result<()> {
    let dir = TempDir::new("dashboard-api")?;
    let demo = Demo::start(PLEXUS, &dir, &[]).await?;
    let api = demo.api();

    // Every page path answers the shell, with a policy allowing nothing but this origin.
    for page in
        ["/", "/topology", "/services", "/workloads", "/routes", "/policies", "/tap", "/certificates", "/performance"]
    {
        let r = get(api, page).await?;
        assert_eq!(r.status, 200, "{page}");
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"), "{page}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{page}: {csp}");
        assert!(r.text().contains(r#"<script type="module" src="/assets/js/app.js">"#), "{page}");
    }
    let js = get(api, "/assets/js/pages/topology.js").await?;
    assert_eq!(js.status, 200);
    assert_eq!(js.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(js.header("cache-control"), Some("no-cache"));
    let etag = js.header("etag").context("etag")?.to_string();
    let again = plexus_testkit::client::get(
        api,
        &api.to_string(),
        "/assets/js/pages/topology.js",
        &[("if-none-match", &etag)],
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(again.status, 304, "a current copy is not sent again");
    assert_eq!(get(api, "/assets/app.css").await?.header("content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(get(api, "/assets/favicon.svg").await?.header("content-type"), Some("image/svg+xml"));
    assert_eq!(get(api, "/assets/nothing.js").await?.status, 404);
    assert_eq!(get(api, "/nowhere").await?.status, 404, "only the page paths answer the shell");

    // Findings: a route to a missing Service is reported against that route.
    let clean = get_json(api, "/api/v1/findings").await?;
    assert_eq!(clean["errors"], 0, "the demo has no errors: {clean}");
    demo.apply(
        &dir,
        "broken.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-nowhere}\nspec:\n  parentRefs: [{kind: Service, name: details, port: 9080}]\n  rules: [{backendRefs: [{name: nowhere, port: 9080}]}]\n",
    )?;
    let findings = get_json(api, "/api/v1/findings").await?;
    assert_eq!(findings["errors"], 1, "{findings}");
    let f = &findings["findings"][0];
    assert_eq!((f["severity"].as_str(), f["kind"].as_str()), (Some("error"), Some("HTTPRoute")), "{f}");
    assert_eq!((f["namespace"].as_str(), f["name"].as_str()), (Some("default"), Some("to-nowhere")), "{f}");
    assert!(f["message"].as_str().is_some_and(|m| m.contains("nowhere")) && f["hint"].is_string(), "{f}");

    // Overview: counts of every kind, proxies and their sync state, findings.
    let o = get_json(api, "/api/v1/overview").await?;
    // The demo's `bookinfo` route (on Gateway `ingress`) and `to-nowhere`.
    assert_eq!(o["counts"]["HTTPRoute"], 2, "{o}");
    assert_eq!(o["counts"]["Gateway"], 1, "{o}");
    assert!(o["counts"]["Service"].as_u64().is_some_and(|n| n >= 4), "{o}");
    assert_eq!(o["counts"]["AuthorizationPolicy"], 0, "{o}");
    assert!(o["proxies"]["connected"].as_u64().is_some_and(|n| n >= 7), "six Bookinfo sidecars and the ingress: {o}");
    assert_eq!(o["proxies"]["byMode"]["ingress"], 1, "{o}");
    assert_eq!(o["findings"]["errors"], 1, "{o}");

    // Series: one point per step, the newest holding the pages just fetched.
    for _ in 0..10 {
        demo.get("/productpage").await?;
    }
    let api_ = api;
    let series = eventually(Duration::from_secs(20), || async move {
        let s = get_json(api_, "/api/v1/stat/series?kind=service&name=productpage&window=1m&step=10s").await?;
        let recent: u64 =
            s["series"][0]["requests"].as_array().context("requests")?.iter().filter_map(Value::as_u64).sum();
        ensure!(recent >= 10, "{recent} requests in the series so far: {s}");
        Ok(s)
    })
    .await?;
    assert_eq!(
        (series["kind"].as_str(), series["window"].as_str(), series["step"].as_str()),
        (Some("service"), Some("1m"), Some("10s"))
    );
    assert_eq!(series["times"].as_array().map(Vec::len), Some(6), "{series}");
    assert_eq!(series["series"].as_array().map(Vec::len), Some(1), "only the name asked for: {series}");
    let p = &series["series"][0];
    assert_eq!(p["name"], "productpage");
    for field in ["requests", "requestsPerSecond", "successRate", "p50Ms", "p95Ms", "p99Ms", "mtlsShare"] {
        assert_eq!(p[field].as_array().map(Vec::len), Some(6), "{field}: {p}");
    }
    assert!(p["successRate"].as_array().into_iter().flatten().filter_map(Value::as_f64).any(|s| s > 0.9), "{p}");
    let workloads = get_json(api, "/api/v1/stat/series?kind=workload").await?;
    assert_eq!(workloads["times"].as_array().map(Vec::len), Some(60), "10m in 10s steps by default");
    assert!(
        workloads["series"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"].as_str().is_some_and(|n| n.starts_with("reviews-v"))),
        "{workloads}"
    );
    for bad in [
        "/api/v1/stat/series?kind=pods",
        "/api/v1/stat/series?window=1h",
        "/api/v1/stat/series?window=1m&step=2m",
        "/api/v1/stat/series?step=100ms",
    ] {
        let r = get(api, bad).await?;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.json()?["error"].is_string(), "{bad}");
    }
    demo.stop().await
}

/// The topology layout's own tests (many synthetic graphs, no browser).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_layout_has_no_overlapping_labels() -> Result<()> {
    if !require_tool("node") {
        return Ok(());
    }
    let mut node = command("node");
    node.args(["--test", "layout.test.mjs"]).current_dir(scripts());
    let out = run(&mut node, Duration::from_secs(120)).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    ensure!(
        out.status.success(),
        "node --test layout.test.mjs failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(stdout.contains("# fail 0") && !stdout.contains("# pass 0"), "{stdout}");
    Ok(())
}

/// A request to the control plane's API with the admin token, fully read.
async fn api_call(demo: &Demo, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
    use plexus_testkit::http_body_util::Full;
    let token = std::fs::read_to_string(demo.data.join(plexus_control::datadir::ADMIN_TOKEN))?;
    let req = plexus_testkit::http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", demo.api().to_string())
        .header("authorization", format!("Bearer {}", token.trim()))
        .header("content-type", "application/json")
        .body(Full::new(plexus_testkit::bytes::Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))?;
    let r = plexus_testkit::client::send_collect(
        demo.api(),
        plexus_testkit::client::Version::Http1,
        req,
        Duration::from_secs(15),
    )
    .await?;
    let json = if r.body.is_empty() { Value::Null } else { r.json().with_context(|| format!("{method} {path}"))? };
    Ok((r.status.as_u16(), json))
}

/// `answer` read as the CLI reads it (`T`) and written back as the server writes it: nothing
/// lost, renamed or retyped on the way.
fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(what: &str, answer: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(answer.clone()).with_context(|| format!("{what}: {answer:#}"))?;
    let again = serde_json::to_value(&typed)?;
    ensure!(&again == answer, "{what} changed through the shared type:\nserver: {answer:#}\ntyped:  {again:#}");
    Ok(typed)
}

/// Every answer of the API the CLI reads, from a live control plane with Bookinfo running
/// (proxies with certificates, traffic, a gateway, tokens, a bench run), round-trips through
/// the typed rows of `plexus_control::api_types` unchanged: the server and the CLI cannot
/// drift apart, and the wire format the dashboard reads is what these types write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_round_trip_through_the_shared_types() -> Result<()> {
    use plexus_control::api_types::*;
    let dir = TempDir::new("api-types")?;
    let demo = Demo::start(PLEXUS, &dir, &[]).await?;
    demo.every_version_answers().await?;
    let api = demo.api();

    round_trips::<Health>("/healthz", &get_json(api, "/healthz").await?)?;
    round_trips::<VersionInfo>("version", &get_json(api, "/api/v1/version").await?)?;

    // Every proxy has its certificate and every reviews version has had traffic.
    let proxies: ProxiesResponse = eventually(Duration::from_secs(30), || async {
        let p: ProxiesResponse = round_trips("proxies", &get_json(api, "/api/v1/proxies").await?)?;
        ensure!(p.proxies.len() >= 7 && p.proxies.iter().all(|p| p.certificate.is_some()), "{p:?}");
        Ok(p)
    })
    .await?;
    let identity: IdentityStatus = round_trips("identity", &get_json(api, "/api/v1/identity").await?)?;
    ensure!(identity.proxies.len() >= 7 && identity.control_plane.is_some(), "{identity:?}");
    ensure!(identity.proxies.iter().all(|p| p.issued_by == CertOrigin::Current), "{identity:?}");
    for kind in ["service", "workload"] {
        let path = format!("/api/v1/stat?kind={kind}&window=1m");
        let stat: StatAnswer = eventually(Duration::from_secs(30), || async {
            let stat: StatAnswer = round_trips(&path, &get_json(api, &path).await?)?;
            ensure!(!stat.rows.is_empty(), "no {kind} rows yet");
            Ok(stat)
        })
        .await?;
        ensure!(stat.window == "1m" && stat.rows.iter().all(|r| r.requests > 0), "{stat:?}");
    }
    for kind in ["services", "workloads", "gateways", "httproutes"] {
        let path = format!("/api/v1/resources/{kind}?namespace=all");
        let list: ResourceList = round_trips(&path, &get_json(api, &path).await?)?;
        ensure!(!list.items.is_empty(), "no {kind}");
        for item in list.items {
            plexus_core::resource_from_value(item).map_err(|e| anyhow::anyhow!("{kind}: {e}"))?;
        }
    }

    // The gateway's own report, read through the control plane (what `plexus check` reads).
    let ingress = proxies.proxies.iter().find(|p| p.record.mode == "ingress").context("no ingress proxy")?;
    let path = format!("/api/v1/proxies/{}/config?namespace={}", ingress.record.workload, ingress.record.namespace);
    let config = get_json(api, &path).await?;
    let report: plexus_proxy::gateway::GatewayReport = round_trips("gateway report", &config["gateway"])?;
    ensure!(!report.ports.is_empty() && report.ports.values().all(|p| p.error.is_none()), "{report:?}");

    // Tokens: created, listed, revoked.
    let (status, created) =
        api_call(&demo, "POST", "/api/v1/tokens", Some(serde_json::json!({"serviceAccount": "roundtrip"}))).await?;
    ensure!(status == 200, "{created}");
    let created: TokenCreated = round_trips("token created", &created)?;
    ensure!(created.anchor_pem.contains("BEGIN CERTIFICATE") && !created.token.token.is_empty());
    let (_, list) = api_call(&demo, "GET", "/api/v1/tokens", None).await?;
    let list: TokenList = round_trips("tokens", &list)?;
    ensure!(list.items.iter().any(|t| t.id == created.token.id && t.state == "valid"), "{list:?}");
    let (_, revoked) = api_call(&demo, "DELETE", &format!("/api/v1/tokens/{}", created.token.id), None).await?;
    ensure!(round_trips::<TokenRevoked>("token revoked", &revoked)?.revoked == created.token.id);

    // Apply refused (422 with one row per problem), applied, deleted.
    let bad = serde_json::json!({"source": "t.yaml", "items": [{"apiVersion": "plexus.dev/v1alpha1", "kind": "Service",
        "metadata": {"name": "Bad_Name"}, "spec": {"ports": [{"name": "http", "port": 0}]}}]});
    let (status, refused) = api_call(&demo, "POST", "/api/v1/apply", Some(bad)).await?;
    ensure!(status == 422, "{refused}");
    let refused: ErrorBody = round_trips("apply refused", &refused)?;
    ensure!(!refused.errors.is_empty() && refused.errors.iter().all(|e| e.file == "t.yaml"), "{refused:?}");
    let good = serde_json::json!({"source": "t.yaml", "items": [{"apiVersion": "plexus.dev/v1alpha1", "kind": "Service",
        "metadata": {"name": "roundtrip"}, "spec": {"ports": [{"name": "http", "port": 9999}]}}]});
    let (status, applied) = api_call(&demo, "POST", "/api/v1/apply", Some(good)).await?;
    ensure!(status == 200, "{applied}");
    round_trips::<ApplyResponse>("applied", &applied)?;
    let items =
        serde_json::json!({"items": [{"kind": "Service", "name": "roundtrip"}, {"kind": "Service", "name": "none"}]});
    let (_, deleted) = api_call(&demo, "POST", "/api/v1/delete", Some(items)).await?;
    let deleted: DeleteResults = round_trips("deleted", &deleted)?;
    ensure!(deleted.results.iter().map(|r| r.deleted).collect::<Vec<_>>() == [true, false], "{deleted:?}");
    let (status, missing) = api_call(&demo, "GET", "/api/v1/resources/services/default/none", None).await?;
    ensure!(status == 404 && !round_trips::<ErrorBody>("not found", &missing)?.error.is_empty());

    // A bench run stored by `plexus bench`, listed and read back.
    let url = format!("http://{}/productpage", demo.ingress);
    let out = demo.cli(&["bench", &url, "-r", "20", "-d", "1s", "--warmup", "0s"])?;
    ensure!(out.status.success(), "bench: {}", String::from_utf8_lossy(&out.stderr));
    let runs: RunList = round_trips("bench runs", &get_json(api, "/api/v1/bench/results").await?)?;
    let run = runs.items.first().context("no stored run")?;
    let stored = get_json(api, &format!("/api/v1/bench/results/{}", run.id)).await?;
    round_trips::<StoredRun>("bench run", &stored)?;

    // Last, as it changes the issuer: a rotation's answer.
    let (status, rotated) = api_call(&demo, "POST", "/api/v1/identity/rotate", Some(serde_json::json!({}))).await?;
    ensure!(status == 200, "{rotated}");
    ensure!(round_trips::<Rotated>("rotated", &rotated)?.rotated == "issuer");
    demo.stop().await
}
