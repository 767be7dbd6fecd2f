//! End-to-end protocol tests of `plexus proxy` against real peers: curl, h2load, Python
//! grpcio and websockets, and raw TCP clients.
//!
//! Every scenario runs over one hop (client → plexus → app) and, where it makes sense, two
//! hops (client → client sidecar → server sidecar → app): the test names end in `one_hop`
//! and `two_hops`. A missing peer tool skips the test with `SKIPPED: ...` on stderr, or fails
//! it under `CI=true`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Hops, Mesh, TEST_TIMEOUT, curl_ok, python_client, python_server, run_peer, show};
use plexus_testkit::client::{self, PatternBody, Version};
use plexus_testkit::http::Request;
use plexus_testkit::{
    HttpEcho, SERVER_FIRST_GREETING, ServerFirst, ServicePort, TCP_ECHO_FINAL_LINE, TCP_ECHO_SERVER_BYE,
    TCP_ECHO_SERVER_CLOSES_FIRST, TcpEcho, TempDir, require_python_module, require_tool, serial,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Generates `NAME::one_hop` and `NAME::two_hops` tests calling `NAME(Hops)`, each bounded by
/// [`TEST_TIMEOUT`].
macro_rules! both_hops {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_hop() {
                tokio::time::timeout(TEST_TIMEOUT, super::$name(Hops::One))
                    .await
                    .expect(concat!(stringify!($name), " (one hop) did not finish in time"));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_hops() {
                tokio::time::timeout(TEST_TIMEOUT, super::$name(Hops::Two))
                    .await
                    .expect(concat!(stringify!($name), " (two hops) did not finish in time"));
            }
        }
    )*};
}

both_hops!(
    curl_keepalive,
    curl_chunked_upload,
    curl_expect_continue,
    curl_http2_prior_knowledge,
    curl_explicit_proxy_absolute_form,
    curl_connect_tunnel,
    connect_tunnel_raw_tcp,
    h2load_many_streams,
    grpc_all_kinds,
    websocket_echo,
    tcp_opaque_half_close,
    tcp_detected_half_close,
    tcp_opaque_ports_flag_half_close,
    server_first_greeting,
    big_upload_http1,
    big_upload_http2,
);

const ECHO: &str = "echo-v1";

/// The `-w` format appended after each response body by curl.
/// (It must not start with `@`, which makes curl read the format from a file.)
const W: &str = "## %{http_code} %{http_version} %{num_connects} [%header{x-served-by}]\n";

/// One response as printed by curl with [`W`].
#[derive(Debug)]
struct CurlResponse {
    body: String,
    code: String,
    http_version: String,
    connects: u32,
    served_by: String,
}

impl CurlResponse {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.body))
    }
}

/// Splits curl's stdout into responses (each body followed by a `##` line).
fn curl_responses(out: &std::process::Output) -> Vec<CurlResponse> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut responses = Vec::new();
    let mut body = String::new();
    for line in text.split_inclusive('\n') {
        let Some(rest) = line.strip_prefix("## ") else {
            body.push_str(line);
            continue;
        };
        let mut parts = rest.trim_end().splitn(4, ' ');
        let code = parts.next().unwrap_or_default().to_string();
        let http_version = parts.next().unwrap_or_default().to_string();
        let connects = parts.next().and_then(|c| c.parse().ok()).unwrap_or(u32::MAX);
        let served_by = parts.next().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        responses.push(CurlResponse { body: std::mem::take(&mut body), code, http_version, connects, served_by });
    }
    responses
}

/// Checks curl's responses to JSON (non-`/echo`) requests for `paths`: status 200, served by
/// [`ECHO`], the app saw the path; and (with `one_connection`) that curl opened exactly one
/// connection for all of them.
fn check_json_responses(
    out: &std::process::Output,
    paths: &[&str],
    one_connection: bool,
    what: &str,
) -> Vec<serde_json::Value> {
    let rs = curl_responses(out);
    assert_eq!(rs.len(), paths.len(), "{what}: expected {} responses\n{}", paths.len(), show(out));
    let mut bodies = Vec::new();
    for (r, path) in rs.iter().zip(paths) {
        assert_eq!(r.code, "200", "{what}: status for {path}\n{}", show(out));
        assert_eq!(r.served_by, ECHO, "{what}: x-served-by for {path}\n{}", show(out));
        let j = r.json();
        assert_eq!(j["path"], *path, "{what}: path the app saw\n{}", show(out));
        assert_eq!(j["served_by"], ECHO);
        bodies.push(j);
    }
    if !one_connection {
        return bodies;
    }
    let connects: Vec<u32> = rs.iter().map(|r| r.connects).collect();
    let mut expected = vec![0; paths.len()];
    expected[0] = 1;
    assert_eq!(
        connects,
        expected,
        "{what}: curl's new connections per request (1 then 0s = the proxy kept the client \
         connection alive)\n{}",
        show(out)
    );
    bodies
}

async fn echo_mesh(hops: Hops) -> (HttpEcho, Mesh) {
    let echo = HttpEcho::start(ECHO).await.expect("start echo app");
    let mesh = Mesh::start(hops, "echo", ServicePort::new("http", 8080, Some("http")), echo.port(), &[]).await;
    (echo, mesh)
}

/// Writes `len` pattern bytes to a file in `dir`.
fn pattern_file(dir: &TempDir, name: &str, len: usize) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, client::pattern(0, len)).expect("write pattern file");
    path
}

// ------------------------------------------------------------------ curl, HTTP/1.1

/// Several URLs in one curl invocation reuse one client connection; requests are routed by
/// the `--upstream` bind, then by `Host` on the outbound port.
async fn curl_keepalive(hops: Hops) {
    if !require_tool("curl") {
        return;
    }
    let (echo, mesh) = echo_mesh(hops).await;
    let up = mesh.upstream();
    let paths = ["/one?n=1", "/two?n=2", "/three?n=3"];
    let urls: Vec<String> = paths.iter().map(|p| format!("http://{up}{p}")).collect();
    let mut args = vec!["-w", W, "-H", "x-test: kept"];
    args.extend(urls.iter().map(String::as_str));
    let out = curl_ok(&args).await;
    for j in check_json_responses(&out, &paths, true, "keep-alive via --upstream bind") {
        assert_eq!(j["method"], "GET");
        assert_eq!(j["headers"]["x-test"], "kept", "request header lost: {j}");
    }

    let out_addr = mesh.outbound();
    let paths = ["/a", "/b/c?d=e"];
    let urls: Vec<String> = paths.iter().map(|p| format!("http://{out_addr}{p}")).collect();
    let mut args = vec!["-w", W, "-H", "Host: echo:8080"];
    args.extend(urls.iter().map(String::as_str));
    let out = curl_ok(&args).await;
    for j in check_json_responses(&out, &paths, true, "keep-alive via outbound port, Host routing") {
        assert_eq!(j["authority"], "echo:8080", "Host the app saw: {j}");
    }
    assert_eq!(echo.requests(), 5, "requests that reached the app");
    mesh.assert_traversed().await;
}

/// A `Transfer-Encoding: chunked` request body arrives intact (echoed back, and counted by
/// the app).
async fn curl_chunked_upload(hops: Hops) {
    if !require_tool("curl") {
        return;
    }
    let (_echo, mesh) = echo_mesh(hops).await;
    let up = mesh.upstream();
    let len = 3 * 1024 * 1024 + 17;
    let input = pattern_file(&mesh.dir, "chunked.bin", len);
    let output = mesh.dir.join("chunked.out");
    let data = format!("@{}", input.display());
    let url = format!("http://{up}/echo/chunked");
    let out = curl_ok(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Content-Type: application/x-test",
        "--data-binary",
        &data,
        "-o",
        output.to_str().expect("utf-8"),
        "-w",
        "%{http_code} %{content_type}",
        &url,
    ])
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 application/x-test",
        "status and content type of the echo\n{}",
        show(&out)
    );
    let got = std::fs::read(&output).expect("read curl output");
    assert_eq!(got.len(), len, "echoed body length");
    assert!(got == client::pattern(0, len), "echoed body differs from the upload");

    let url = format!("http://{up}/count");
    let out = curl_ok(&["-H", "Transfer-Encoding: chunked", "--data-binary", &data, &url]).await;
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e})\n{}", show(&out)));
    assert_eq!(j["body_len"], len as u64, "body length the app received: {j}");
    assert_eq!(j["method"], "POST");
    assert!(j["body_error"].is_null(), "the app saw a body error: {j}");
    mesh.assert_traversed().await;
}

/// `Expect: 100-continue`: curl waits for `100 Continue` before sending the body; with an
/// expect timeout longer than the whole transfer budget, the upload only succeeds if the
/// interim response reaches curl.
async fn curl_expect_continue(hops: Hops) {
    if !require_tool("curl") {
        return;
    }
    let (_echo, mesh) = echo_mesh(hops).await;
    let up = mesh.upstream();
    let len = 2 * 1024 * 1024;
    let input = pattern_file(&mesh.dir, "expect.bin", len);
    let data = format!("@{}", input.display());
    let url = format!("http://{up}/upload");
    let out = run_peer(
        "curl",
        &[
            "-sS",
            "-v",
            "--max-time",
            "15",
            "--expect100-timeout",
            "60",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &data,
            &url,
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "upload with Expect: 100-continue failed (a 100 Continue never reached curl?)\n{}",
        show(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("< HTTP/1.1 100"), "curl did not receive an interim 100 Continue\n{}", show(&out));
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e})\n{}", show(&out)));
    assert_eq!(j["body_len"], len as u64, "body length the app received: {j}");
    mesh.assert_traversed().await;
}

// ------------------------------------------------------------------ curl, HTTP/2

/// h2c prior knowledge: two requests on one connection, a body echoed, and routing by
/// `:authority` on the outbound port.
async fn curl_http2_prior_knowledge(hops: Hops) {
    if !require_tool("curl") {
        return;
    }
    let (_echo, mesh) = echo_mesh(hops).await;
    let up = mesh.upstream();
    let paths = ["/h2/one", "/h2/two?x=1"];
    let urls: Vec<String> = paths.iter().map(|p| format!("http://{up}{p}")).collect();
    // The later transfers must not repeat --http2-prior-knowledge (curl 7.88 then fails
    // with "Error in the HTTP2 framing layer" even against a plain h2c server); without it
    // they can only be HTTP/2 by reusing the first transfer's connection.
    let args = ["--http2-prior-knowledge", "-w", W, &urls[0], "--next", "-w", W, &urls[1]];
    let out = curl_ok(&args).await;
    check_json_responses(&out, &paths, true, "h2c via --upstream bind");
    for r in curl_responses(&out) {
        assert_eq!(r.http_version, "2", "curl's negotiated HTTP version\n{}", show(&out));
    }

    let len = 1024 * 1024 + 3;
    let input = pattern_file(&mesh.dir, "h2.bin", len);
    let output = mesh.dir.join("h2.out");
    let data = format!("@{}", input.display());
    let url = format!("http://{up}/echo/h2");
    let out = curl_ok(&[
        "--http2-prior-knowledge",
        "--data-binary",
        &data,
        "-o",
        output.to_str().expect("utf-8"),
        "-w",
        "%{http_code} %{http_version}",
        &url,
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2", "{}", show(&out));
    assert!(
        std::fs::read(&output).expect("read output") == client::pattern(0, len),
        "h2 echoed body differs from the upload"
    );

    let url = format!("http://{}/by-authority", mesh.outbound());
    let out = curl_ok(&["--http2-prior-knowledge", "-w", W, "-H", "Host: echo:8080", &url]).await;
    let js = check_json_responses(&out, &["/by-authority"], true, "h2c via outbound port, :authority");
    assert_eq!(js[0]["authority"], "echo:8080", "authority the app saw: {}", js[0]);
    mesh.assert_traversed().await;
}

// ------------------------------------------------------------------ explicit proxy

/// `curl -x`: absolute-form requests by service name (with and without namespace), on one
/// kept-alive connection to the proxy; the app sees origin-form paths.
async fn curl_explicit_proxy_absolute_form(hops: Hops) {
    if !require_tool("curl") {
        return;
    }
    let (echo, mesh) = echo_mesh(hops).await;
    let proxy = format!("http://{}", mesh.outbound());
    let out =
        curl_ok(&["-x", &proxy, "-w", W, "http://echo:8080/abs?q=1", "http://echo.default:8080/with/namespace"]).await;
    let js = check_json_responses(&out, &["/abs?q=1", "/with/namespace"], true, "explicit proxy, absolute-form");
    assert!(
        js[0]["headers"].get("proxy-connection").is_none(),
        "hop-by-hop Proxy-Connection header forwarded to the app: {}",
        js[0]
    );
    assert_eq!(echo.requests(), 2);
    mesh.assert_traversed().await;
}

/// `curl -p -x`: a CONNECT tunnel to `echo:8080`, then plain HTTP inside it.
async fn curl_connect_tunnel(hops: Hops) {
    if !require_tool("curl") {
        return;
    }
    let (_echo, mesh) = echo_mesh(hops).await;
    let proxy = format!("http://{}", mesh.outbound());
    let out = curl_ok(&["-v", "-p", "-x", &proxy, "-w", W, "http://echo:8080/tunneled"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("> CONNECT echo:8080"), "curl did not use CONNECT\n{}", show(&out));
    assert!(
        stderr.lines().any(|l| l.starts_with("< HTTP/1.1 200") || l.starts_with("< HTTP/1.0 200")),
        "CONNECT was not answered 200\n{}",
        show(&out)
    );
    check_json_responses(&out, &["/tunneled"], true, "request inside the CONNECT tunnel");
    mesh.assert_traversed().await;
}

/// A raw CONNECT to a TCP Service, then echo through the tunnel with half-close.
async fn connect_tunnel_raw_tcp(hops: Hops) {
    let app = TcpEcho::start().await.expect("start tcp echo");
    let mesh = Mesh::start(hops, "tcpecho", ServicePort::new("tcp", 9000, Some("tcp")), app.port(), &[]).await;
    let mut s = client::connect(mesh.outbound()).await.expect("connect to outbound");
    s.write_all(b"CONNECT tcpecho:9000 HTTP/1.1\r\nHost: tcpecho:9000\r\n\r\n").await.expect("send CONNECT");
    let mut head = Vec::new();
    let read_head = async {
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.expect("read CONNECT response") == 0 {
                break;
            }
            head.push(b[0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_head).await.expect("no CONNECT response within 10 s");
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "CONNECT response: {head:?}\n{}",
        mesh.stderr()
    );
    tcp_exchange(s, 256 * 1024, "through a CONNECT tunnel").await;
    mesh.assert_traversed().await;
}

// ------------------------------------------------------------------ h2load

/// h2load: 2000 requests, 4 connections, 50 concurrent streams each; none may fail.
async fn h2load_many_streams(hops: Hops) {
    if !require_tool("h2load") {
        return;
    }
    let (echo, mesh) = echo_mesh(hops).await;
    let url = format!("http://{}/load", mesh.upstream());
    let out = run_peer("h2load", &["-n", "2000", "-c", "4", "-m", "50", &url]).await;
    check_h2load(&out, 2000, "via --upstream bind");
    assert_eq!(echo.requests(), 2000, "requests that reached the app");

    let url = format!("http://{}/load-authority", mesh.outbound());
    let out = run_peer("h2load", &["-n", "500", "-c", "2", "-m", "50", "-H", ":authority: echo:8080", &url]).await;
    check_h2load(&out, 500, "via outbound port, :authority routing");
    assert_eq!(echo.requests(), 2500, "requests that reached the app");
    mesh.assert_traversed().await;
}

fn check_h2load(out: &std::process::Output, n: u64, what: &str) {
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |line_prefix: &str, name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(line_prefix))?;
        line[line_prefix.len()..].split(',').find_map(|part| {
            let mut it = part.split_whitespace();
            let v = it.next()?.parse().ok()?;
            (it.next()? == name).then_some(v)
        })
    };
    let get = |p: &str, name: &str| {
        field(p, name).unwrap_or_else(|| panic!("{what}: no `{name}` in h2load's `{p}` line\n{}", show(out)))
    };
    assert!(out.status.success(), "{what}: h2load failed\n{}", show(out));
    assert_eq!(get("requests:", "succeeded"), n, "{what}: succeeded\n{}", show(out));
    assert_eq!(get("requests:", "failed"), 0, "{what}: failed\n{}", show(out));
    assert_eq!(get("requests:", "errored"), 0, "{what}: errored\n{}", show(out));
    assert_eq!(get("requests:", "timeout"), 0, "{what}: timeout\n{}", show(out));
    assert_eq!(get("status codes:", "2xx"), n, "{what}: 2xx\n{}", show(out));
}

// ------------------------------------------------------------------ gRPC, WebSocket

/// grpcio client ↔ grpcio server: unary (with a 1 MiB message), client-, server- and bidi
/// streaming, trailers, request metadata, NOT_FOUND with a message, UNIMPLEMENTED.
async fn grpc_all_kinds(hops: Hops) {
    if !require_python_module("grpc", "grpcio") {
        return;
    }
    let (_server, port) = python_server("grpc_peer.py", "grpc-backend").await;
    let mesh = Mesh::start(hops, "greeter", ServicePort::new("grpc", 50051, Some("grpc")), port, &[]).await;
    let up = mesh.upstream().to_string();
    python_client(
        "grpc_peer.py",
        &["--target", &up, "--expect-served-by", "grpc-backend"],
        &format!("gRPC via --upstream bind ({hops:?})"),
    )
    .await;
    let out = mesh.outbound().to_string();
    python_client(
        "grpc_peer.py",
        &["--target", &out, "--authority", "greeter:50051", "--expect-served-by", "grpc-backend"],
        &format!("gRPC via outbound port by :authority ({hops:?})"),
    )
    .await;
    mesh.assert_traversed().await;
}

/// websockets client ↔ websockets server: Host and path preserved, text and binary echoes
/// (lock-step and pipelined), ping, clean close.
async fn websocket_echo(hops: Hops) {
    if !require_python_module("websockets", "websockets") {
        return;
    }
    let (_server, port) = python_server("ws_peer.py", "ws-backend").await;
    let mesh = Mesh::start(hops, "chat", ServicePort::new("http", 8765, Some("http")), port, &[]).await;
    let up = mesh.upstream().to_string();
    python_client(
        "ws_peer.py",
        &["--connect", &up, "--host", "chat:8765", "--expect-served-by", "ws-backend"],
        &format!("WebSocket via --upstream bind ({hops:?})"),
    )
    .await;
    let out = mesh.outbound().to_string();
    python_client(
        "ws_peer.py",
        &["--connect", &out, "--host", "chat:8765", "--expect-served-by", "ws-backend"],
        &format!("WebSocket via outbound port by Host ({hops:?})"),
    )
    .await;
    mesh.assert_traversed().await;
}

// ------------------------------------------------------------------ TCP

/// Over an established stream to the TCP echo app: one chunk echoed while the connection is
/// fully open (both directions), then `size` more bytes, a half-close by the client, and
/// the app's final line must still arrive, followed by EOF.
async fn tcp_exchange(s: TcpStream, size: usize, what: &str) {
    let (mut rd, mut wr) = s.into_split();
    let first = b"\x00\x01binary-not-http\xff\xfe first chunk\n";
    wr.write_all(first).await.expect("write first chunk");
    let mut got = vec![0u8; first.len()];
    tokio::time::timeout(Duration::from_secs(10), rd.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: first chunk not echoed within 10 s"))
        .unwrap_or_else(|e| panic!("{what}: reading the first echo: {e}"));
    assert_eq!(got, first, "{what}: first echo");

    let writer = tokio::spawn(async move {
        let mut off = 0;
        while off < size {
            let n = (size - off).min(64 * 1024);
            wr.write_all(&client::pattern(off as u64, n)).await?;
            off += n;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: no EOF within 60 s after the client's half-close (got {} bytes)", rest.len())
        })
        .unwrap_or_else(|e| panic!("{what}: reading the echo: {e}"));
    let _wr = writer.await.expect("writer task").expect("write + half-close");
    assert!(
        rest.len() >= size && rest[..size] == client::pattern(0, size)[..],
        "{what}: echoed data differs (got {} bytes, sent {size})",
        rest.len()
    );
    assert_eq!(
        String::from_utf8_lossy(&rest[size..]),
        String::from_utf8_lossy(TCP_ECHO_FINAL_LINE),
        "{what}: after the client's half-close the app's final line must still reach the client"
    );
}

async fn tcp_case(hops: Hops, port: ServicePort, extra: &[&str], what: &str) {
    let app = TcpEcho::start().await.expect("start tcp echo");
    let name = "tcpecho";
    let mesh = Mesh::start(hops, name, port, app.port(), extra).await;
    for i in 0..2 {
        let s = client::connect(mesh.upstream()).await.expect("connect to upstream bind");
        tcp_exchange(s, 4 * 1024 * 1024, &format!("{what}, connection {i}")).await;
    }
    server_closes_first(&app, mesh.upstream(), what).await;
    assert_eq!(app.connections(), 3, "{what}: connections that reached the app");
    mesh.assert_traversed().await;
}

/// The other direction of half-close: the app shuts down its side first; the client must
/// see the app's last bytes then EOF, and can still send (the app counts what arrives).
async fn server_closes_first(app: &TcpEcho, addr: SocketAddr, what: &str) {
    let mut s = client::connect(addr).await.expect("connect to upstream bind");
    s.write_all(TCP_ECHO_SERVER_CLOSES_FIRST).await.expect("write command");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: the app half-closed first, but no EOF reached the client within 10 s                  (got {:?})",
                String::from_utf8_lossy(&got)
            )
        })
        .unwrap_or_else(|e| panic!("{what}: reading after the app's half-close: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(TCP_ECHO_SERVER_BYE),
        "{what}: the app's last bytes before its half-close"
    );
    let size = 1024 * 1024;
    s.write_all(&client::pattern(0, size)).await.unwrap_or_else(|e| {
        panic!("{what}: sending after the app's half-close failed (the proxy closed the whole connection?): {e}")
    });
    s.shutdown().await.expect("client half-close");
    let received = plexus_testkit::eventually(Duration::from_secs(10), || async {
        let n = app.received_after_close();
        anyhow::ensure!(n >= size as u64, "the app received {n} of {size} bytes");
        Ok(n)
    })
    .await;
    match received {
        Ok(n) => assert_eq!(n, size as u64, "{what}: bytes the app received after its half-close"),
        Err(e) => panic!("{what}: after the app half-closed, the client's data must still reach it: {e:#}"),
    }
}

/// `appProtocol: opaque`.
async fn tcp_opaque_half_close(hops: Hops) {
    tcp_case(hops, ServicePort::new("tcp", 9000, Some("opaque")), &[], "appProtocol opaque").await;
}

/// No appProtocol: the proxy must detect that client-first binary bytes are not HTTP.
async fn tcp_detected_half_close(hops: Hops) {
    tcp_case(hops, ServicePort::new("tcp", 9000, None), &[], "detected as TCP").await;
}

/// No appProtocol, but the port is listed in `--opaque-ports`.
async fn tcp_opaque_ports_flag_half_close(hops: Hops) {
    tcp_case(hops, ServicePort::new("mysql", 3306, None), &["--opaque-ports", "25,3306"], "--opaque-ports 3306").await;
}

/// A server-first protocol: the greeting reaches the client within 50 ms of connecting,
/// with no configuration (no appProtocol, not an opaque port).
async fn server_first_greeting(hops: Hops) {
    let _serial = serial().await;
    let app = ServerFirst::start().await.expect("start server-first app");
    let mesh = Mesh::start(hops, "smtp", ServicePort::new("smtp", 2525, None), app.port(), &[]).await;
    let mut timings = Vec::new();
    for i in 0..3 {
        let start = Instant::now();
        let mut s = client::connect(mesh.upstream()).await.expect("connect to upstream bind");
        let mut greeting = vec![0u8; SERVER_FIRST_GREETING.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
            .await
            .unwrap_or_else(|_| panic!("connection {i}: no greeting within 5 s\n{}", mesh.stderr()))
            .unwrap_or_else(|e| panic!("connection {i}: reading the greeting: {e}\n{}", mesh.stderr()));
        let elapsed = start.elapsed();
        timings.push(elapsed);
        assert_eq!(
            String::from_utf8_lossy(&greeting),
            String::from_utf8_lossy(SERVER_FIRST_GREETING),
            "connection {i}: greeting"
        );
        s.write_all(b"EHLO plexus\r\n").await.expect("write");
        let mut echo = vec![0u8; 13];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .expect("no echo within 5 s")
            .expect("read echo");
        assert_eq!(echo, b"EHLO plexus\r\n", "connection {i}: echo after the greeting");
    }
    println!("{hops:?}: server-first greeting after {timings:?}");
    // SPEC §4: the greeting reaches the client within 50 ms (the proxies' 10 ms client-first
    // wait, then the early connection). On a machine loaded by parallel tests one connection can
    // be scheduled late, so the promise is checked on the fastest of three; every one of them
    // must still come long before the header read timeout a detection without the early
    // connection would wait for (10 s).
    let fastest = timings.iter().min().copied().unwrap_or_default();
    assert!(
        fastest < Duration::from_millis(50),
        "server-first greeting must reach the client within 50 ms of connect; took {timings:?}"
    );
    assert!(
        timings.iter().all(|t| *t < Duration::from_secs(1)),
        "every server-first greeting must come without waiting for detection; took {timings:?}"
    );
    mesh.assert_traversed().await;
}

// ------------------------------------------------------------------ big streamed body

const BIG: u64 = 100 * 1024 * 1024;
const RSS_LIMIT: u64 = 60 * 1024 * 1024;

async fn big_upload_http1(hops: Hops) {
    big_upload(hops, Version::Http1).await;
}

async fn big_upload_http2(hops: Hops) {
    big_upload(hops, Version::Http2).await;
}

/// 100 MiB streamed up (chunked / h2 DATA) and echoed back while being sent; the echo must be
/// byte-identical, and every proxy's RSS stays under 60 MiB throughout.
async fn big_upload(hops: Hops, version: Version) {
    let (_echo, mesh) = echo_mesh(hops).await;
    let up: SocketAddr = mesh.upstream();

    let pids: Vec<(String, u32)> = mesh.proxies().iter().map(|p| (p.name().to_string(), p.pid())).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pids = pids.clone();
        tokio::spawn(async move {
            let mut max = vec![0u64; pids.len()];
            while !stop.load(Ordering::Relaxed) {
                for (i, (_, pid)) in pids.iter().enumerate() {
                    if let Ok(rss) = plexus_testkit::rss_bytes(*pid) {
                        max[i] = max[i].max(rss);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            max
        })
    };

    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let uri = match version {
        Version::Http1 => "/echo/big".to_string(),
        Version::Http2 => "http://echo:8080/echo/big".to_string(),
    };
    let mut req = Request::post(uri);
    if version == Version::Http1 {
        req = req.header("host", "echo:8080");
    }
    let req = req
        .header("content-type", "application/octet-stream")
        .body(PatternBody::new(BIG, false).with_progress(sent.clone()))
        .expect("request");
    let transfer = async {
        let resp = client::request(up, version, req).await?;
        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
        client::verify_pattern_body(resp.into_body(), Some(received.clone())).await
    };
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(180), transfer).await;
    stop.store(true, Ordering::Relaxed);
    let max = sampler.await.expect("sampler");
    let progress = format!(
        "sent {} MiB, received back {} MiB after {:?}",
        sent.load(Ordering::Relaxed) >> 20,
        received.load(Ordering::Relaxed) >> 20,
        started.elapsed()
    );
    match result {
        Err(_) => panic!("{version:?} 100 MiB echo did not complete within 180 s: {progress}\n{}", mesh.stderr()),
        Ok(Err(e)) => panic!("{version:?} 100 MiB echo failed: {e:#} ({progress})\n{}", mesh.stderr()),
        Ok(Ok(n)) => assert_eq!(n, BIG, "{version:?}: echoed length ({progress})"),
    }
    println!(
        "{hops:?} {version:?}: {progress}; peak RSS (KiB): {:?}",
        pids.iter().map(|(n, _)| n).zip(max.iter().map(|r| r / 1024)).collect::<Vec<_>>()
    );
    for ((name, _), rss) in pids.iter().zip(&max) {
        assert!(
            *rss > 0 && *rss < RSS_LIMIT,
            "{version:?}: {name} peak RSS {} KiB during the 100 MiB transfer, limit {} KiB",
            rss / 1024,
            RSS_LIMIT / 1024
        );
    }
    mesh.assert_traversed().await;
}
