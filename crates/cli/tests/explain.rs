//! `plexus routes` and `plexus explain`: their output on a resources file (no control plane),
//! and a property test that what `plexus_core::explain` predicts is what a real proxy does.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, Result};
use plexus_core::explain::{ExplainRequest, explain};
use plexus_core::{MeshSnapshot, parse_documents};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::http::Request;
use plexus_testkit::http_body_util::{BodyExt as _, Empty};
use plexus_testkit::hyper::client::conn::http1;
use plexus_testkit::hyper_util::rt::TokioIo;
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, command, free_port, run};
use serde_json::Value;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

/// Bookinfo-like routes for `reviews`: a header rule, a regex rule, an 80/20 split, a
/// redirect, a missing backend; no workloads needed.
const ROUTES: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080, appProtocol: http}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews-v1}
spec: {selector: {app: reviews, version: v1}, ports: [{port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews-v2}
spec: {selector: {app: reviews, version: v2}, ports: [{port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews-v3}
spec: {selector: {app: reviews, version: v3}, ports: [{port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-3, labels: {app: reviews, version: v3}}
spec: {address: 127.0.0.3, ports: [{port: 7003}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews-v1, weight: 80}, {name: reviews-v2, weight: 20}]
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v3}]
    timeouts: {request: 2s}
  - matches: [{path: {type: RegularExpression, value: "/ratings/[0-9]+"}}]
    backendRefs: [{name: reviews-v2}]
  - matches: [{path: {type: Exact, value: /legacy}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, path: {type: ReplaceFullPath, replaceFullPath: /v2}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /beta}}]
    backendRefs: [{name: reviews-v9}]
---
apiVersion: plexus.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: reviews-v3}
spec: {targetRef: {kind: Service, name: reviews-v3}, requestsPerSecond: 50, burst: 100}
"#;

async fn plexus(args: &[&str]) -> Output {
    let mut cmd = command(PLEXUS);
    cmd.args(args);
    run(&mut cmd, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e:#}"))
}

fn show(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "{}", show(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{}", show(out)))
}

/// A `--server` where nothing listens, so `explain -f` evaluates the file alone.
fn nowhere() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_explain_on_a_resources_file() {
    let dir = TempDir::new("explain-file").expect("temp dir");
    let file = dir.join("reviews.yaml");
    std::fs::write(&file, ROUTES).expect("write resources");
    let file = file.to_str().expect("utf-8 path");
    let server = nowhere();

    // The table, in precedence order: exact, regex, longest prefix, then headers before a bare /.
    let routes = json_of(&plexus(&["routes", "reviews", "-f", file, "-o", "json"]).await);
    let port = &routes["ports"][0];
    assert_eq!(port["service"], "reviews.default");
    assert_eq!(port["port"], 9080);
    let order: Vec<(u64, &str)> = port["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|e| (e["rule"].as_u64().expect("rule"), e["match"].as_str().expect("match")))
        .collect();
    assert_eq!(
        order,
        [
            (3, "path = /legacy"),
            (2, "path ~ /ratings/[0-9]+"),
            (4, "path prefix /beta"),
            (1, "header end-user = jason"),
            (0, "any request"),
        ],
        "{routes:#}"
    );
    let split = &port["routes"][4]["backends"];
    assert_eq!(split[0]["service"], "reviews-v1.default");
    assert_eq!(split[0]["percent"], 80.0);
    assert_eq!(split[1]["percent"], 20.0);
    assert_eq!(port["routes"][0]["filters"]["redirect"]["status"], 301);
    assert_eq!(port["routes"][2]["backends"][0]["exists"], false, "reviews-v9 does not exist");
    assert_eq!(port["routes"][3]["requestTimeout"], "2s");
    assert_eq!(port["policy"]["loadBalancer"], "ewma");

    let explain_json = |args: Vec<&'static str>| {
        let (file, server) = (file.to_string(), server.clone());
        async move {
            let mut all: Vec<String> =
                ["explain", "--from", "productpage", "-f", &file, "--server", &server, "-o", "json"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            all.extend(args.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            json_of(&plexus(&refs).await)
        }
    };

    // A header rule: deterministic, with its timeout and the rate limit of its backend.
    let x = explain_json(vec!["--to", "reviews:9080", "--path", "/reviews/1", "--header", "End-User=jason"]).await;
    assert!(x["config"].as_str().expect("config").contains("alone"), "{x:#}");
    assert_eq!(x["source"], "productpage");
    assert_eq!(x["route"]["name"], "default/reviews");
    assert_eq!(x["route"]["rule"], 1);
    assert_eq!(x["predictedBackend"], "reviews-v3.default");
    let target = &x["outcomes"][0];
    assert_eq!(target["action"], "forward");
    assert_eq!(target["timeouts"]["request"]["value"], "2s");
    assert_eq!(target["rateLimit"]["requestsPerSecond"], 50);
    assert_eq!(target["rateLimit"]["burst"], 100);
    assert_eq!(target["endpoints"][0]["address"], "127.0.0.3:7003");
    assert_eq!(x["authorization"]["allowed"], true, "{x:#}");
    assert_eq!(x["authorization"]["policy"], "mesh default (allow)");

    // The regex wins over the header rule (path before headers).
    let x = explain_json(vec!["--to", "reviews", "--path", "/ratings/42", "-H", "end-user=jason"]).await;
    assert_eq!(x["route"]["rule"], 2, "{x:#}");
    assert_eq!(x["predictedBackend"], "reviews-v2.default");

    // The 80/20 split: no single prediction, both shares.
    let x = explain_json(vec!["--to", "reviews", "--path", "/reviews/1?x=1"]).await;
    assert_eq!(x["route"]["rule"], 0, "{x:#}");
    assert!(x.get("predictedBackend").is_none(), "{x:#}");
    let shares: Vec<(&str, f64)> = x["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .map(|o| (o["service"].as_str().expect("service"), o["percent"].as_f64().expect("percent")))
        .collect();
    assert_eq!(shares, [("reviews-v1.default", 80.0), ("reviews-v2.default", 20.0)]);

    // The redirect, with the query kept.
    let x = explain_json(vec!["--to", "reviews", "--path", "/legacy?a=1"]).await;
    assert_eq!(x["outcomes"][0]["action"], "redirect", "{x:#}");
    assert_eq!(x["outcomes"][0]["status"], 301);
    assert_eq!(x["outcomes"][0]["location"], "https://reviews/v2?a=1");

    // A missing backend answers 500.
    let x = explain_json(vec!["--to", "reviews", "--path", "/beta/x", "-X", "post"]).await;
    assert_eq!(x["request"]["method"], "POST");
    assert_eq!(x["backends"][0]["exists"], false, "{x:#}");
    assert_eq!(x["outcomes"][0]["action"], "fail");
    assert_eq!(x["outcomes"][0]["error"], "backend not found: reviews-v9.default");

    // A Service without routes: sent to the Service itself.
    let x = explain_json(vec!["--to", "reviews-v3", "--path", "/"]).await;
    assert_eq!(x["route"]["description"], "no route: sent to the Service itself", "{x:#}");
    assert_eq!(x["predictedBackend"], "reviews-v3.default");

    // The human form has the aligned lines.
    let out = plexus(&["explain", "--to", "reviews", "--path", "/reviews/1", "-f", file, "--server", &server]).await;
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for label in
        ["route:", "backends:", "outcome:", "filters:", "timeouts:", "retries:", "rate limit:", "authorization:"]
    {
        assert!(text.lines().any(|l| l.starts_with(label)), "no {label:?} line in\n{text}");
    }
    assert!(text.contains("forward to reviews-v1.default:9080 (80%)"), "{text}");

    // Errors: bad header syntax is a usage error; an unknown Service is "not found".
    let out = plexus(&["explain", "--to", "reviews", "--header", "oops", "-f", file, "--server", &server]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --header \"oops\""), "{}", show(&out));
    let out = plexus(&["routes", "nope", "-f", file]).await;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: service default/nope not found"), "{}", show(&out));
    let out = plexus(&["explain", "--to", "nope", "-f", file, "--server", &server]).await;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    // Without -f, explain needs the control plane.
    let out = plexus(&["explain", "--to", "reviews", "--server", &server]).await;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the control plane"), "{}", show(&out));
}

/// The backend Services of the property test; each has one echo workload of the same name.
const BACKENDS: &[&str] =
    &["b-exact", "b-api", "b-v2", "b-regex", "b-post", "b-admin", "b-debug", "b-env", "b-combo", "b-health"];

/// Rules where every entry has one backend, so each request's backend is determined.
const PROPERTY_ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: front-routes}
spec:
  parentRefs: [{kind: Service, name: front, port: 8080}]
  rules:
  - matches: [{path: {type: Exact, value: /api/v2/health}}]
    backendRefs: [{name: b-exact, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: b-api, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api/v2/}}]
    backendRefs: [{name: b-v2, port: 8080}]
  - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
    backendRefs: [{name: b-regex, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: b-post, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-user, value: admin}]}]
    backendRefs: [{name: b-admin, port: 8080}]
  - matches: [{queryParams: [{name: debug, value: "1"}]}]
    backendRefs: [{name: b-debug, port: 8080}]
  - matches: [{headers: [{name: x-env, type: RegularExpression, value: "dev|test"}]}]
    backendRefs: [{name: b-env, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /static}, method: PUT, headers: [{name: x-user, value: admin}]}]
    backendRefs: [{name: b-combo, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other}
spec:
  parentRefs: [{kind: Service, name: front}]
  rules:
  - matches: [{path: {type: Exact, value: /health}}, {path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: b-health, port: 8080}]
"#;

const METHODS: &[&str] = &["GET", "POST", "PUT"];
const PATHS: &[&str] = &[
    "/",
    "/api",
    "/api/",
    "/api/v2",
    "/api/v2/",
    "/api/v2/health",
    "/api/v2/users",
    "/apix",
    "/api/v3/x",
    "/items/42",
    "/items/abc",
    "/items/42/x",
    "/static/a.css",
    "/static",
    "/health",
    "/healthz",
    "/x/y",
];
const QUERIES: &[Option<&str>] = &[None, Some("debug=1"), Some("debug=0"), Some("a=1&debug=1"), Some("debug")];
const USERS: &[Option<&str>] = &[None, Some("admin"), Some("guest")];
const ENVS: &[Option<&str>] = &[None, Some("dev"), Some("prod"), Some("test")];

fn random_request(rng: &mut fastrand::Rng) -> ExplainRequest {
    let pick = |rng: &mut fastrand::Rng, n: usize| rng.usize(..n);
    let method = METHODS[pick(rng, METHODS.len())];
    let path = PATHS[pick(rng, PATHS.len())];
    let query = QUERIES[pick(rng, QUERIES.len())];
    let mut headers = Vec::new();
    if let Some(u) = USERS[pick(rng, USERS.len())] {
        headers.push(("x-user".to_string(), u.to_string()));
    }
    if let Some(e) = ENVS[pick(rng, ENVS.len())] {
        headers.push(("x-env".to_string(), e.to_string()));
    }
    let path = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    ExplainRequest { method: method.to_string(), path, headers }
}

/// Sends one request through the proxy's outbound port (explicit mode, `Host` names the
/// Service) and returns the status and who answered.
async fn send(sender: &mut http1::SendRequest<Empty<Bytes>>, r: &ExplainRequest) -> Result<(u16, String)> {
    sender.ready().await?;
    let mut builder = Request::builder().method(r.method.as_str()).uri(r.path.as_str()).header("host", "front:8080");
    for (k, v) in &r.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(builder.body(Empty::new())?))
        .await
        .context("no answer within 10 s")??;
    let status = resp.status().as_u16();
    let by = resp.headers().get("x-served-by").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    resp.into_body().collect().await?;
    Ok((status, by))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_predicts_what_the_proxy_does() -> Result<()> {
    let seed: u64 = std::env::var("PLEXUS_EXPLAIN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_e7a1);
    println!("explain property test: seed {seed} (set PLEXUS_EXPLAIN_SEED to replay another)");

    let mut echoes = Vec::new();
    let mut resources = Resources::new();
    for name in BACKENDS.iter().copied().chain(["front"]) {
        let echo = HttpEcho::start(name).await?;
        resources = resources
            .service(name, &[ServicePort::new("http", 8080, Some("http"))])
            .workload(&WorkloadSpec::plain(name, name, "http", echo.port()));
        echoes.push(echo);
    }
    let resources = resources.raw(PROPERTY_ROUTES);
    let dir = TempDir::new("explain-prop")?;
    let file = dir.join("mesh.yaml");
    resources.write(&file)?;
    let snapshot = MeshSnapshot::compile(
        &parse_documents("mesh.yaml", &resources.to_yaml()).map_err(|e| anyhow::anyhow!("invalid resources: {e:?}"))?,
        "test",
    );
    let proxy = Proxy::start_named(
        "proxy",
        PLEXUS,
        [
            "proxy",
            "--resources",
            file.to_str().context("path")?,
            "--outbound-port",
            "0",
            "--inbound-port",
            "0",
            "--admin-port",
            "0",
        ],
    )
    .await?;

    let mut rng = fastrand::Rng::with_seed(seed);
    let requests: Vec<ExplainRequest> = (0..1000).map(|_| random_request(&mut rng)).collect();
    let mut predictions = Vec::with_capacity(requests.len());
    for r in &requests {
        let x = explain(&snapshot, Some("property-test"), "front:8080", r).map_err(anyhow::Error::msg)?;
        let backend = x.predicted_backend.with_context(|| format!("no single prediction for {r:?}"))?;
        let name = backend.strip_suffix(".default").context("a default-namespace backend")?.to_string();
        predictions.push(name);
    }

    // Four keep-alive connections share the requests.
    let outbound: SocketAddr = proxy.outbound();
    let mut workers = Vec::new();
    for w in 0..4usize {
        let mine: Vec<(usize, ExplainRequest)> =
            requests.iter().cloned().enumerate().filter(|(i, _)| i % 4 == w).collect();
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(outbound).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut answers = Vec::new();
            for (i, r) in mine {
                let (status, by) = send(&mut sender, &r).await.with_context(|| format!("request {i}: {r:?}"))?;
                answers.push((i, status, by));
            }
            anyhow::Ok(answers)
        }));
    }
    let mut answered = vec![(0u16, String::new()); requests.len()];
    for w in workers {
        for (i, status, by) in w.await?? {
            answered[i] = (status, by);
        }
    }

    let mut mismatches = Vec::new();
    for (i, (r, predicted)) in requests.iter().zip(&predictions).enumerate() {
        let (status, by) = &answered[i];
        if *status != 200 || by != predicted {
            mismatches.push(format!(
                "#{i} {} {} {:?}: predicted {predicted}, got status {status} from {by:?}",
                r.method, r.path, r.headers
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "seed {seed}: {} of {} requests went elsewhere than predicted:\n{}",
        mismatches.len(),
        requests.len(),
        mismatches.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );

    // The requests exercised every rule (b-health's /api match is shadowed by front-routes).
    for name in BACKENDS.iter().copied().chain(["front"]) {
        let n = predictions.iter().filter(|p| *p == name).count();
        assert!(n > 0, "seed {seed}: no request was routed to {name}; the request sets do not cover the rules");
    }
    let served: u64 = echoes.iter().map(HttpEcho::requests).sum();
    assert_eq!(served, requests.len() as u64, "every request reached exactly one echo server");
    println!("explain property test: {} requests, all answered by the predicted backend", requests.len());
    Ok(())
}
