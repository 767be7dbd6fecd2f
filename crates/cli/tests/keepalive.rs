//! Connection timing on the proxy's HTTP listeners (issue 18): an idle keep-alive connection
//! lives for the idle timeout, not the header read timeout; the header read timeout starts at
//! a request's first byte and still cuts a head that is too slow (slowloris).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::http::Request;
use plexus_testkit::http_body_util::{BodyExt as _, Empty};
use plexus_testkit::hyper::client::conn::http1;
use plexus_testkit::hyper_util::rt::TokioIo;
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// An echo app behind a proxy (`--resources`, Service `app` on 8080) with a 1 s header read
/// timeout and a 4 s idle timeout.
async fn proxy_with_short_timeouts(dir: &TempDir) -> Result<(HttpEcho, Proxy)> {
    let app = HttpEcho::start("app-1").await?;
    let resources = dir.join("resources.yaml");
    Resources::new()
        .service("app", &[ServicePort::new("http", 8080, Some("http"))])
        .workload(&WorkloadSpec::plain("app-1", "app", "http", app.port()))
        .write(&resources)?;
    let proxy = Proxy::start_named(
        "proxy",
        PLEXUS,
        [
            "proxy",
            "--resources",
            resources.to_str().context("path")?,
            "--outbound-port",
            "0",
            "--inbound-port",
            "0",
            "--admin-port",
            "0",
            "--header-read-timeout",
            "1s",
            "--idle-timeout",
            "4s",
        ],
    )
    .await?;
    Ok((app, proxy))
}

async fn get(sender: &mut http1::SendRequest<Empty<Bytes>>) -> Result<u16> {
    sender.ready().await?;
    let req = Request::get("/").header("host", "app:8080").body(Empty::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// A keep-alive connection idle for twice the header read timeout still serves its next
/// request; left idle, it is closed once the idle timeout has passed (not before).
#[tokio::test]
async fn keep_alive_idles_for_the_idle_timeout_not_the_header_read_timeout() -> Result<()> {
    let dir = TempDir::new("keepalive")?;
    let (_app, proxy) = proxy_with_short_timeouts(&dir).await?;
    let stream = TcpStream::connect(proxy.outbound()).await?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    let mut conn = tokio::spawn(conn);
    assert_eq!(get(&mut sender).await?, 200, "positive control");
    tokio::time::sleep(HEADER_READ_TIMEOUT * 2).await;
    assert!(!conn.is_finished(), "the keep-alive connection was closed after the header read timeout");
    assert_eq!(get(&mut sender).await?, 200, "the same connection after idling past the header read timeout");
    let idle_from = Instant::now();
    tokio::time::timeout(IDLE_TIMEOUT * 3, &mut conn).await.context("never closed when idle")??.ok();
    let idled = idle_from.elapsed();
    assert!(idled >= IDLE_TIMEOUT - Duration::from_millis(200), "closed after {idled:?}, before the idle timeout");
    Ok(())
}

/// Reads until the proxy closes the connection; returns what it sent and when it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<(String, Instant)> {
    let mut out = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut out)).await.context("connection not closed")?.ok();
    Ok((String::from_utf8_lossy(&out).into_owned(), Instant::now()))
}

/// Slow heads: a head that stops half-way, and one trickled a byte at a time, are cut about
/// one header read timeout after their first byte, unanswered by the app; a head sent in
/// pieces that completes within the timeout is served.
#[tokio::test]
async fn a_request_head_must_complete_within_the_header_read_timeout_of_its_first_byte() -> Result<()> {
    let dir = TempDir::new("slowloris")?;
    let (app, proxy) = proxy_with_short_timeouts(&dir).await?;
    let addr: SocketAddr = proxy.outbound();

    // Positive control: three pieces over 0.4 s.
    let mut ok = TcpStream::connect(addr).await?;
    for piece in ["GET / HTTP/1.1\r\n", "Host: app:8080\r\n", "Connection: close\r\n\r\n"] {
        ok.write_all(piece.as_bytes()).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (answer, _) = read_until_closed(&mut ok, Duration::from_secs(5)).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let served = app.requests();

    // Stops half-way.
    let mut half = TcpStream::connect(addr).await?;
    half.write_all(b"GET / HTTP/1.1\r\nHost: app").await?;
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut half, Duration::from_secs(5)).await?;
    let took = closed - started;
    assert!(!answer.contains(" 200 "), "{answer}");
    assert!(took >= HEADER_READ_TIMEOUT - Duration::from_millis(200) && took < HEADER_READ_TIMEOUT * 3, "{took:?}");

    // Trickled: every byte is progress, but the clock runs from the first one.
    let mut trickle = TcpStream::connect(addr).await?;
    let started = Instant::now();
    let head =
        b"GET / HTTP/1.1\r\nHost: app:8080\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_after = None;
    for b in head {
        if trickle.write_all(&[*b]).await.is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = match cut_after {
        Some(t) => t,
        None => {
            let (answer, closed) = read_until_closed(&mut trickle, Duration::from_secs(5)).await?;
            assert!(!answer.contains(" 200 "), "a trickled head was served: {answer}");
            closed - started
        }
    };
    assert!(took < HEADER_READ_TIMEOUT * 3, "trickled head not cut: {took:?}");
    assert_eq!(app.requests(), served, "a slow head reached the app");

    // A keep-alive connection whose second head is slow is cut too, after its first request.
    let mut second = TcpStream::connect(addr).await?;
    second.write_all(b"GET / HTTP/1.1\r\nHost: app:8080\r\n\r\n").await?;
    let mut first = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut first)).await??;
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"), "positive control");
    tokio::time::sleep(HEADER_READ_TIMEOUT * 2).await;
    second.write_all(b"GET / HTTP/1.1\r\nHo").await?;
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut second, Duration::from_secs(5)).await?;
    assert!(closed - started < HEADER_READ_TIMEOUT * 3, "{:?}", closed - started);
    Ok(())
}

/// A client that shuts down its sending side right after its request (as `nc` does when its
/// input ends) still gets the response, with and without a body; a positive control on the same
/// proxy first.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_response() -> Result<()> {
    let dir = TempDir::new("halfclose")?;
    let (_app, proxy) = proxy_with_short_timeouts(&dir).await?;
    let requests: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: app:8080\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app:8080\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: app:8080\r\nContent-Length: 5\r\n\r\nhello",
    ];
    for (i, request) in requests.iter().enumerate() {
        let mut stream = TcpStream::connect(proxy.outbound()).await?;
        stream.write_all(request).await?;
        if i > 0 {
            // The first request is the positive control: the client keeps its side open.
            stream.shutdown().await?;
        }
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.context("no answer")??;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer:?}");
    }
    Ok(())
}
