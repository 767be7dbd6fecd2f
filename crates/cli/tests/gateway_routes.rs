//! Gateway API conformance behaviours at a Gateway, each test named after the upstream
//! conformance test it follows (gateway-api `conformance/tests/httproute-*.go`), with our own
//! setup: a gateway proxy from a resources file, HTTP echo backends, real HTTP requests.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use plexus_testkit::client::{self, Collected};
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, free_port};

mod common;

use common::PLEXUS;

/// A gateway proxy serving Gateway `gw` (listeners in `listeners`, YAML list items) with
/// `routes` (YAML documents), backends `names` (Services on port 8080, one echo each).
struct Setup {
    _proxy: Proxy,
    backends: Vec<HttpEcho>,
    _dir: TempDir,
}

async fn setup(names: &[&str], listeners: &str, routes: &str, ports: &[u16]) -> Result<Setup> {
    let dir = TempDir::new("gateway-routes")?;
    let mut res = Resources::new();
    let mut backends = Vec::new();
    for name in names {
        let echo = HttpEcho::start(name).await?;
        res = res.service(name, &[ServicePort::new("http", 8080, Some("http"))]).workload(&WorkloadSpec::plain(
            &format!("{name}-1"),
            name,
            "http",
            echo.port(),
        ));
        backends.push(echo);
    }
    let yaml = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  listeners:\n{listeners}{routes}",
        res.to_yaml()
    );
    let file = dir.join("resources.yaml");
    std::fs::write(&file, yaml)?;
    let proxy = Proxy::start_gateway(PLEXUS, "gw", &file, &[], ports).await?;
    Ok(Setup { _proxy: proxy, backends, _dir: dir })
}

fn route(name: &str, parent: &str, hostnames: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{parent}]\n  hostnames: [{hostnames}]\n  rules:\n{rules}"
    )
}

async fn get(port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<Collected> {
    client::get(SocketAddr::from(([127, 0, 0, 1], port)), host, path, headers, Duration::from_secs(10)).await
}

fn served_by(r: &Collected) -> &str {
    r.header("x-served-by").unwrap_or("")
}

/// `GET /` with each Host: served 200 by the backend named, or 404 from the gateway for "".
async fn expect_hosts_served(port: u16, cases: &[(&str, &str)]) -> Result<()> {
    for (host, want) in cases {
        let r = get(port, host, "/", &[]).await?;
        if want.is_empty() {
            ensure!(r.status == 404, "{host}: {} {}", r.status, r.text());
        } else {
            ensure!(r.status == 200 && served_by(&r) == *want, "{host}: {} from {:?}", r.status, served_by(&r));
        }
    }
    Ok(())
}

/// A gateway with one HTTP listener on a free port (every hostname) and one HTTPRoute `name`
/// attached to it with `rules` (YAML list items); its port and setup.
async fn single_route(name: &str, backends: &[&str], rules: &str) -> Result<(u16, Setup)> {
    let port = free_port();
    let routes = route(name, "{kind: Gateway, name: gw}", "", rules);
    let listener = format!("  - {{name: http, port: {port}, protocol: HTTP}}\n");
    let s = setup(backends, &listener, &routes, &[port]).await?;
    Ok((port, s))
}

/// A rule sending everything to `backend`'s port 8080.
fn to_backend(backend: &str) -> String {
    format!("  - backendRefs: [{{name: {backend}, port: 8080}}]\n")
}

/// Upstream `HTTPRouteListenerHostnameMatching`: listeners with hostnames bar.com,
/// foo.bar.com, *.bar.com and *.foo.com on one port, one route per listener (sectionName);
/// each request goes to the route of the most specific listener matching its Host, and a Host
/// no listener serves gets 404.
#[tokio::test]
async fn httproute_listener_hostname_matching() -> Result<()> {
    let port = free_port();
    let listeners = format!(
        "  - {{name: listener-1, port: {port}, protocol: HTTP, hostname: bar.com}}\n  - {{name: listener-2, port: {port}, protocol: HTTP, hostname: foo.bar.com}}\n  - {{name: listener-3, port: {port}, protocol: HTTP, hostname: \"*.bar.com\"}}\n  - {{name: listener-4, port: {port}, protocol: HTTP, hostname: \"*.foo.com\"}}\n"
    );
    let rules = to_backend;
    let routes = [
        route("backend-v1", "{kind: Gateway, name: gw, sectionName: listener-1}", "", &rules("infra-backend-v1")),
        route("backend-v2", "{kind: Gateway, name: gw, sectionName: listener-2}", "", &rules("infra-backend-v2")),
        route("backend-v3", "{kind: Gateway, name: gw, sectionName: listener-3}", "", &rules("infra-backend-v3")),
        route("backend-v3b", "{kind: Gateway, name: gw, sectionName: listener-4}", "", &rules("infra-backend-v3")),
    ]
    .concat();
    let _s = setup(&["infra-backend-v1", "infra-backend-v2", "infra-backend-v3"], &listeners, &routes, &[port]).await?;
    expect_hosts_served(
        port,
        &[
            ("bar.com", "infra-backend-v1"),
            ("foo.bar.com", "infra-backend-v2"),
            ("baz.bar.com", "infra-backend-v3"),
            ("boo.bar.com", "infra-backend-v3"),
            ("multiple.prefixes.bar.com", "infra-backend-v3"),
            ("multiple.prefixes.foo.com", "infra-backend-v3"),
            ("foo.com", ""),
            ("no.matching.host", ""),
        ],
    )
    .await
}

/// Upstream `HTTPRouteHostnameIntersection`: a route's hostnames intersected with its
/// listener's; names outside the intersection are not served by that route.
#[tokio::test]
async fn httproute_hostname_intersection() -> Result<()> {
    let port = free_port();
    let listeners = format!(
        "  - {{name: wildcard, port: {port}, protocol: HTTP, hostname: \"*.wildcard.io\"}}\n  - {{name: exact, port: {port}, protocol: HTTP, hostname: very.specific.com}}\n"
    );
    let rules = to_backend;
    let routes = [
        // Route names within the listener's wildcard, and one outside it.
        route(
            "specific-host-matches-listener-wildcard",
            "{kind: Gateway, name: gw, sectionName: wildcard}",
            "non.matching.com, foo.wildcard.io, bar.wildcard.io, \"*.anotherwildcard.io\"",
            &rules("infra-backend-v1"),
        ),
        // A route wildcard narrowing to the listener's exact name.
        route(
            "wildcard-host-matches-listener-specific-host",
            "{kind: Gateway, name: gw, sectionName: exact}",
            "\"*.specific.com\", non.matching.com",
            &rules("infra-backend-v2"),
        ),
    ]
    .concat();
    let _s = setup(&["infra-backend-v1", "infra-backend-v2"], &listeners, &routes, &[port]).await?;
    expect_hosts_served(
        port,
        &[
            ("foo.wildcard.io", "infra-backend-v1"),
            ("bar.wildcard.io", "infra-backend-v1"),
            ("very.specific.com", "infra-backend-v2"),
            ("baz.wildcard.io", ""),
            ("non.matching.com", ""),
            ("foo.anotherwildcard.io", ""),
            ("other.specific.com", ""),
        ],
    )
    .await
}

/// Upstream `HTTPRouteHeaderMatching` and `HTTPRouteRequestHeaderModifier` at a Gateway:
/// header matches pick the rule; the rule's header modifier reaches the backend.
#[tokio::test]
async fn httproute_header_matching_and_request_header_modifier() -> Result<()> {
    let rules = "  - matches: [{headers: [{name: version, value: one}]}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: set-value}], add: [{name: x-add, value: added}], remove: [x-remove]}}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]\n";
    let (port, _s) = single_route("headers", &["infra-backend-v1", "infra-backend-v2"], rules).await?;
    let r = get(port, "example.com", "/", &[("version", "one")]).await?;
    ensure!(served_by(&r) == "infra-backend-v1", "{}", r.text());
    let r = get(
        port,
        "example.com",
        "/",
        &[("version", "two"), ("color", "orange"), ("x-remove", "gone"), ("x-add", "mine")],
    )
    .await?;
    ensure!(served_by(&r) == "infra-backend-v2", "{}", r.text());
    let seen = r.json()?;
    ensure!(seen["headers"]["x-set"] == "set-value", "{seen}");
    ensure!(seen["headers"]["x-add"] == "mine, added", "{seen}");
    ensure!(seen["headers"].get("x-remove").is_none(), "{seen}");
    // Only one of the two headers: no rule matches, 404 from the gateway.
    let r = get(port, "example.com", "/", &[("version", "two")]).await?;
    ensure!(r.status == 404, "{} {}", r.status, r.text());
    Ok(())
}

/// Upstream `HTTPRouteRewritePath` and `HTTPRouteRequestRedirect` (hostname, path) at a
/// Gateway: the backend sees the rewritten path; a redirect answers with its Location.
#[tokio::test]
async fn httproute_rewrite_path_and_request_redirect() -> Result<()> {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /full}}]\n    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example.com, path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /moved}}]\n    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]\n";
    let (port, _s) = single_route("rewrites", &["infra-backend-v1"], rules).await?;
    let r = get(port, "example.com", "/prefix/one/two?q=1", &[]).await?;
    ensure!(r.json()?["path"] == "/one/two?q=1", "{}", r.text());
    let r = get(port, "example.com", "/full/anything", &[]).await?;
    let seen = r.json()?;
    ensure!(seen["path"] == "/replaced" && seen["headers"]["host"] == "rewritten.example.com", "{seen}");
    let r = get(port, "example.com", "/moved/page?x=y", &[]).await?;
    ensure!(r.status == 302, "{}", r.status);
    // No scheme change: the listener's port stays in the Location.
    let want = format!("http://example.org:{port}/new/page?x=y");
    ensure!(r.header("location") == Some(want.as_str()), "{:?}", r.header("location"));
    Ok(())
}

/// Upstream `HTTPRouteWeight`: 80/20 weights over two backends, and `HTTPRouteTimeoutRequest`:
/// a backend slower than `timeouts.request` gets 504.
#[tokio::test]
async fn httproute_weight_and_timeout_request() -> Result<()> {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /slow}}]\n    timeouts: {request: 200ms}\n    backendRefs: [{name: slow, port: 8080}]\n  - backendRefs: [{name: infra-backend-v1, port: 8080, weight: 80}, {name: infra-backend-v2, port: 8080, weight: 20}]\n";
    let (port, s) = single_route("weights", &["infra-backend-v1", "infra-backend-v2", "slow"], rules).await?;
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..200 {
        let r = get(port, "example.com", "/", &[]).await?;
        match served_by(&r) {
            "infra-backend-v1" => v1 += 1,
            "infra-backend-v2" => v2 += 1,
            other => anyhow::bail!("served by {other:?}: {}", r.status),
        }
    }
    // 80/20 of 200: well within 120..=190 for v1 (binomial, sd ≈ 5.7).
    ensure!((120..=190).contains(&v1) && v2 > 10, "v1 {v1}, v2 {v2}");
    s.backends[2].set_delay(Duration::from_secs(5));
    expect_cut_short(port, "/slow").await
}

/// `GET path` to a backend that takes 5 s: 504 from the gateway well before that.
async fn expect_cut_short(port: u16, path: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let r = get(port, "example.com", path, &[]).await?;
    ensure!(r.status == 504, "{} {}", r.status, r.text());
    ensure!(started.elapsed() < Duration::from_secs(4), "not cut short: {:?}", started.elapsed());
    Ok(())
}

/// A request with `method` to `path` (HTTP/1.1, Host `example.com`) at the gateway's `port`.
async fn send(port: u16, method: &str, path: &str) -> Result<Collected> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "example.com")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    client::send_collect(addr, client::Version::Http1, req, Duration::from_secs(10)).await
}

/// Upstream `HTTPRouteQueryParamMatching` and `HTTPRouteMethodMatching` at a Gateway: query
/// parameters and the method pick the rule; a request matching no rule gets 404.
#[tokio::test]
async fn httproute_query_param_matching_and_method_matching() -> Result<()> {
    let rules = "  - matches: [{queryParams: [{name: animal, value: whale}]}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]\n  - matches: [{method: POST, path: {type: PathPrefix, value: /method}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{method: GET, path: {type: PathPrefix, value: /method}}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]\n";
    let (port, _s) = single_route("matches", &["infra-backend-v1", "infra-backend-v2"], rules).await?;
    for (path, want) in [
        ("/?animal=whale", "infra-backend-v1"),
        ("/?animal=whale&other=1", "infra-backend-v1"),
        ("/?animal=dolphin&color=blue", "infra-backend-v2"),
        ("/?color=blue&animal=dolphin", "infra-backend-v2"),
        ("/?animal=dolphin", ""),
        ("/?ANIMAL=whale", ""),
        ("/?animal=Whale", ""),
    ] {
        let r = get(port, "example.com", path, &[]).await?;
        let got = if r.status == 404 { "" } else { served_by(&r) };
        ensure!(got == want, "{path}: {} from {:?}", r.status, served_by(&r));
    }
    for (method, want) in [("POST", "infra-backend-v1"), ("GET", "infra-backend-v2"), ("PUT", ""), ("post", "")] {
        let r = send(port, method, "/method").await?;
        let got = if r.status == 404 { "" } else { served_by(&r) };
        ensure!(got == want, "{method} /method: {} from {:?}", r.status, served_by(&r));
    }
    Ok(())
}

/// Upstream `HTTPRouteResponseHeaderModifier` and `HTTPRouteRequestMirror` at a Gateway: the
/// client sees the response headers set, added and removed; a mirrored request also reaches
/// the mirror backend while the client gets the primary's answer.
#[tokio::test]
async fn httproute_response_header_modifier_and_request_mirror() -> Result<()> {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /headers}}]\n    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-set, value: set-value}], add: [{name: x-added, value: added}], remove: [x-served-by]}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /mirror}}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v2, port: 8080}}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n";
    let (port, s) = single_route("modifiers", &["infra-backend-v1", "infra-backend-v2"], rules).await?;
    let r = get(port, "example.com", "/headers", &[]).await?;
    ensure!(r.status == 200, "{}", r.status);
    ensure!(r.header("x-set") == Some("set-value") && r.header("x-added") == Some("added"), "{:?}", r.headers);
    ensure!(r.header("x-served-by").is_none(), "removed: {:?}", r.headers);
    ensure!(s.backends[1].requests() == 0, "nothing mirrored yet");
    for i in 0..3 {
        let r = get(port, "example.com", &format!("/mirror/{i}"), &[]).await?;
        ensure!(r.status == 200 && served_by(&r) == "infra-backend-v1", "{} from {:?}", r.status, served_by(&r));
    }
    plexus_testkit::eventually(Duration::from_secs(10), || async {
        let mirrored = s.backends[1].requests();
        ensure!(mirrored == 3, "mirrored {mirrored} of 3");
        Ok(())
    })
    .await
}

/// Upstream `HTTPRouteTimeoutBackendRequest` at a Gateway: a backend slower than
/// `timeouts.backendRequest` gets 504 well before it answers; a fast one is served.
#[tokio::test]
async fn httproute_timeout_backend_request() -> Result<()> {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /slow}}]\n    timeouts: {backendRequest: 200ms}\n    backendRefs: [{name: slow, port: 8080}]\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n    timeouts: {backendRequest: 2s}\n";
    let (port, s) = single_route("timeouts", &["infra-backend-v1", "slow"], rules).await?;
    let r = get(port, "example.com", "/fast", &[]).await?;
    ensure!(r.status == 200 && served_by(&r) == "infra-backend-v1", "{} {}", r.status, r.text());
    s.backends[1].set_delay(Duration::from_secs(5));
    expect_cut_short(port, "/slow").await
}

/// gRPC through the gateway (upstream `GRPCRouteExactMethodMatching`-like): a GRPCRoute attached
/// to the Gateway sends every call kind (unary, streams both ways, errors with trailers) of a
/// grpcio client to a grpcio server; a method the route does not name gets no backend.
#[tokio::test]
async fn grpcroute_through_the_gateway() -> Result<()> {
    if !plexus_testkit::require_python_module("grpc", "grpcio") {
        return Ok(());
    }
    let (_server, backend_port) = common::python_server("grpc_peer.py", "grpc-backend").await;
    let port = free_port();
    let dir = TempDir::new("gateway-grpc")?;
    let res = Resources::new()
        .service("greeter", &[ServicePort::new("grpc", 50051, Some("grpc"))])
        .workload(&WorkloadSpec::plain("greeter-1", "greeter", "grpc", backend_port));
    let yaml = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  listeners:\n  - {{name: grpc, port: {port}, protocol: HTTP, hostname: grpc.example.com}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: echo}}\nspec:\n  parentRefs: [{{kind: Gateway, name: gw}}]\n  rules:\n  - matches: [{{method: {{service: plexus.test.Echo}}}}]\n    backendRefs: [{{name: greeter, port: 50051}}]\n",
        res.to_yaml()
    );
    let file = dir.join("resources.yaml");
    std::fs::write(&file, yaml)?;
    let _proxy = Proxy::start_gateway(PLEXUS, "gw", &file, &[], &[port]).await?;
    let target = format!("127.0.0.1:{port}");
    common::python_client(
        "grpc_peer.py",
        &["--target", &target, "--authority", "grpc.example.com", "--expect-served-by", "grpc-backend"],
        "gRPC through the gateway",
    )
    .await;
    // Another host: no listener serves it (gRPC status UNIMPLEMENTED from the gateway's 404).
    let r = get(port, "other.example.com", "/plexus.test.Echo/Unary", &[]).await?;
    ensure!(r.status == 404, "{}", r.status);
    Ok(())
}
