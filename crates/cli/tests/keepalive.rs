//! Connection timing on the proxy's HTTP listeners (issue 18): an idle keep-alive connection
//! lives for the idle timeout, not the header read timeout; the header read timeout starts at
//! a request's first byte and still cuts a head that is too slow (slowloris); a quiet HTTP/1
//! connection is parked (its buffers given back) and served again from its next byte; pipelined
//! requests are answered in order and `Expect: 100-continue` is honoured (the proxy's own HTTP/1
//! server, `http/h1_server.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::http::Request;
use plexus_testkit::http_body_util::{BodyExt as _, Empty};
use plexus_testkit::hyper::client::conn::http1;
use plexus_testkit::hyper_util::rt::TokioIo;
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, eventually};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// An echo app behind a proxy (`--resources`, Service `app` on 8080) with a 1 s header read
/// timeout and a 4 s idle timeout.
async fn proxy_with_short_timeouts(dir: &TempDir) -> Result<(HttpEcho, Proxy)> {
    proxy_with(dir, &[]).await
}

/// [`proxy_with_short_timeouts`], with more arguments.
async fn proxy_with(dir: &TempDir, more: &[&str]) -> Result<(HttpEcho, Proxy)> {
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
        ]
        .into_iter()
        .chain(more.iter().copied()),
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

const PARK_AFTER: Duration = Duration::from_millis(200);

/// A proxy that parks HTTP/1 connections quiet for 200 ms.
async fn parking_proxy(dir: &TempDir) -> Result<(HttpEcho, Proxy)> {
    proxy_with(dir, &["--release-idle-buffers-after", "200ms"]).await
}

/// Waits until `n` connections are parked.
async fn until_parked(proxy: &Proxy, n: u64) -> Result<()> {
    eventually(Duration::from_secs(5), || async {
        let now = proxy.metric("plexus_http_connections_parked").await?;
        anyhow::ensure!(now == n as f64, "{now} parked, waiting for {n}");
        Ok(())
    })
    .await
}

/// Reads one response with a `content-length` body from `stream`.
async fn read_response(stream: &mut TcpStream) -> Result<String> {
    read_responses(stream, 1).await?.pop().context("one response")
}

/// A keep-alive connection quiet for the park time gives back its buffers (the parked gauge
/// counts it) and serves its next request on the same socket, also when the next request's
/// bytes arrive in pieces, or began before the park (pipelined, partial); a parked connection
/// still closes at the idle timeout and its head clock still runs from a new head's first byte.
#[tokio::test]
async fn a_quiet_keep_alive_connection_is_parked_and_serves_its_next_request() -> Result<()> {
    let dir = TempDir::new("park")?;
    let (app, proxy) = parking_proxy(&dir).await?;
    let mut stream = TcpStream::connect(proxy.outbound()).await?;
    let get = b"GET /first HTTP/1.1\r\nHost: app:8080\r\n\r\n";
    stream.write_all(get).await?;
    let first = read_response(&mut stream).await?;
    assert!(first.starts_with("HTTP/1.1 200") && first.contains("/first"), "positive control: {first}");
    until_parked(&proxy, 1).await?;

    // The next request, in two pieces, on the same socket.
    stream.write_all(b"GET /second HTTP/1.1\r\nHo").await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(b"st: app:8080\r\n\r\n").await?;
    let second = read_response(&mut stream).await?;
    assert!(second.starts_with("HTTP/1.1 200") && second.contains("/second"), "{second}");
    until_parked(&proxy, 1).await?;

    // A request and the start of the next in one write: the rest of the second comes after a
    // park (hyper's unread bytes go to the next connection).
    stream.write_all(b"GET /third HTTP/1.1\r\nHost: app:8080\r\n\r\nGET /fourth HT").await?;
    let third = read_response(&mut stream).await?;
    assert!(third.contains("/third"), "{third}");
    tokio::time::sleep(PARK_AFTER * 3).await;
    stream.write_all(b"TP/1.1\r\nHost: app:8080\r\n\r\n").await?;
    let fourth = read_response(&mut stream).await?;
    assert!(fourth.starts_with("HTTP/1.1 200") && fourth.contains("/fourth"), "{fourth}");
    assert_eq!(app.requests(), 4, "every request reached the app once");

    // Parked, a head that starts and stalls is still cut by the header read timeout.
    until_parked(&proxy, 1).await?;
    stream.write_all(b"GET /fifth HTTP/1.1\r\nHo").await?;
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await?;
    assert!(!answer.contains(" 200 "), "{answer}");
    assert!(closed - started < HEADER_READ_TIMEOUT * 3, "{:?}", closed - started);
    until_parked(&proxy, 0).await?;

    // Parked and left alone: closed at the idle timeout, not before.
    let mut idle = TcpStream::connect(proxy.outbound()).await?;
    idle.write_all(get).await?;
    read_response(&mut idle).await?;
    let idle_from = Instant::now();
    until_parked(&proxy, 1).await?;
    let (_, closed) = read_until_closed(&mut idle, IDLE_TIMEOUT * 3).await?;
    let idled = closed - idle_from;
    assert!(idled >= IDLE_TIMEOUT - Duration::from_millis(200), "closed after {idled:?}, before the idle timeout");
    until_parked(&proxy, 0).await?;
    Ok(())
}

/// Parking never re-serves a connection in the middle of a message: a response that streams
/// with pauses longer than the park time (an echo of a request body sent in pieces) arrives
/// whole; a request whose body the proxy did not read (answered without reaching an app) is
/// not followed by a "request" made of the rest of that body, however long the client waits.
#[tokio::test]
async fn parking_never_cuts_a_message_or_reads_a_body_as_a_request() -> Result<()> {
    let dir = TempDir::new("park-boundary")?;
    let (app, proxy) = parking_proxy(&dir).await?;

    // An echo streamed in three pieces, each after a pause of three park times.
    let mut echo = TcpStream::connect(proxy.outbound()).await?;
    echo.write_all(b"POST /echo HTTP/1.1\r\nHost: app:8080\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for (piece, expect) in [(&b"6\r\n world\r\n"[..], "hello"), (&b"0\r\n\r\n"[..], "world")] {
        while !String::from_utf8_lossy(&got).contains(expect) {
            let n =
                tokio::time::timeout(Duration::from_secs(5), echo.read(&mut buf)).await.context("echo stalled")??;
            anyhow::ensure!(n > 0, "echo closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(PARK_AFTER * 3).await;
        echo.write_all(piece).await?;
    }
    while !String::from_utf8_lossy(&got).ends_with("0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), echo.read(&mut buf)).await.context("echo end")??;
        anyhow::ensure!(n > 0, "echo closed before its end: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200") && text.contains("hello") && text.contains(" world"), "{text}");
    assert_eq!(app.requests(), 1);

    // Positive control: a whole body (read by the app), then a second request on the same
    // connection.
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: app:8080\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let post = |host: String| format!("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n", smuggled.len());
    let mut whole = TcpStream::connect(proxy.outbound()).await?;
    whole.write_all(post("app:8080".into()).as_bytes()).await?;
    whole.write_all(smuggled).await?;
    let read = read_response(&mut whole).await?;
    assert!(read.starts_with("HTTP/1.1 200") && !read.contains("smuggled"), "{read}");
    tokio::time::sleep(PARK_AFTER * 3).await;
    whole.write_all(b"GET /after HTTP/1.1\r\nHost: app:8080\r\n\r\n").await?;
    let after = read_response(&mut whole).await?;
    assert!(after.starts_with("HTTP/1.1 200") && after.contains("/after"), "positive control: {after}");
    let served = app.requests();
    assert_eq!(served, 3);

    // A request the proxy answers itself, without reading its body (to one of its own
    // listeners), whose body is cut short.
    let head = post(format!("127.0.0.1:{}", proxy.admin().port()));
    // The body cut short: its rest, sent after several park times, is never a request.
    for pause in [Duration::ZERO, PARK_AFTER * 3] {
        let mut cut = TcpStream::connect(proxy.outbound()).await?;
        cut.write_all(head.as_bytes()).await?;
        cut.write_all(&smuggled[..10]).await?;
        let refused = read_response(&mut cut).await?;
        assert!(!refused.starts_with("HTTP/1.1 200"), "{refused}");
        tokio::time::sleep(pause).await;
        let _ = cut.write_all(&smuggled[10..]).await;
        let (answer, _) = read_until_closed(&mut cut, Duration::from_secs(5)).await?;
        assert!(!answer.contains("smuggled"), "the rest of a body was served as a request: {answer}");
        assert_eq!(app.requests(), served, "the rest of a body reached the app (pause {pause:?})");
    }
    Ok(())
}

/// Reads from `stream` until it holds `n` whole responses with `content-length` bodies (or
/// 5 s pass), and returns them; bytes beyond those `n` are an error.
async fn read_responses(stream: &mut TcpStream, n: usize) -> Result<Vec<String>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let mut responses = Vec::new();
        let mut rest = &got[..];
        while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .context("no content-length")?
                .parse::<usize>()?;
            if rest.len() < end + 4 + len {
                break;
            }
            responses.push(String::from_utf8_lossy(&rest[..end + 4 + len]).into_owned());
            rest = &rest[end + 4 + len..];
        }
        if responses.len() >= n {
            anyhow::ensure!(
                responses.len() == n && rest.is_empty(),
                "more than {n} responses: {:?}",
                String::from_utf8_lossy(&got)
            );
            return Ok(responses);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.context("no response")??;
        anyhow::ensure!(n > 0, "closed after {} responses: {:?}", responses.len(), String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// Requests pipelined in one write are answered in order, each with its own body; a body
/// that follows `Expect: 100-continue` is read once `100 Continue` has been sent; the
/// connection then still serves a request on its own (the positive control, first).
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_expect_continue_is_honoured() -> Result<()> {
    let dir = TempDir::new("pipelined")?;
    let (_app, proxy) = proxy_with_short_timeouts(&dir).await?;
    let mut stream = TcpStream::connect(proxy.outbound()).await?;
    stream.write_all(b"GET /first HTTP/1.1\r\nHost: app:8080\r\n\r\n").await?;
    let first = read_responses(&mut stream, 1).await?;
    assert!(first[0].starts_with("HTTP/1.1 200") && first[0].contains("\"path\":\"/first\""), "{first:?}");

    let pipelined = b"POST /a HTTP/1.1\r\nHost: app:8080\r\nContent-Length: 3\r\n\r\nabc\
GET /b HTTP/1.1\r\nHost: app:8080\r\n\r\n\
POST /c HTTP/1.1\r\nHost: app:8080\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n";
    stream.write_all(pipelined).await?;
    let answers = read_responses(&mut stream, 3).await?;
    let summary: Vec<(bool, bool, bool)> = answers
        .iter()
        .zip([("/a", 3), ("/b", 0), ("/c", 2)])
        .map(|(r, (path, len))| {
            (
                r.starts_with("HTTP/1.1 200"),
                r.contains(&format!("\"path\":\"{path}\"")),
                r.contains(&format!("\"body_len\":{len}")),
            )
        })
        .collect();
    assert_eq!(summary, vec![(true, true, true); 3], "{answers:#?}");

    stream.write_all(b"PUT /d HTTP/1.1\r\nHost: app:8080\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n").await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.context("no 100")??;
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"wxyz").await?;
    let last = read_responses(&mut stream, 1).await?;
    assert!(last[0].contains("\"path\":\"/d\"") && last[0].contains("\"body_len\":4"), "{last:?}");
    Ok(())
}

/// A client that resets its connection while its request waits for the app is noticed at once:
/// the request is cancelled and recorded as the client's leaving (`response_code="0"`,
/// `response_flags="DC"`) long before the app would have answered; a request answered first
/// is recorded with its 200 (positive control), and a half-close is no reset (the test above).
#[tokio::test]
async fn a_client_that_resets_mid_request_is_recorded_as_gone_at_once() -> Result<()> {
    let dir = TempDir::new("reset")?;
    let (app, proxy) = proxy_with_short_timeouts(&dir).await?;
    let mut control = TcpStream::connect(proxy.outbound()).await?;
    control.write_all(b"GET /control HTTP/1.1\r\nHost: app:8080\r\nConnection: close\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), control.read_to_end(&mut answer)).await.context("no answer")??;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer));

    app.set_delay(Duration::from_secs(3));
    let started = Instant::now();
    let mut reset = TcpStream::connect(proxy.outbound()).await?;
    reset.write_all(b"GET /slow HTTP/1.1\r\nHost: app:8080\r\n\r\n").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    reset.set_zero_linger()?;
    drop(reset);
    let gone = eventually(Duration::from_secs(2), || async {
        let m = proxy.admin_get("/metrics").await?.text();
        let gone = plexus_testkit::metric_sum(
            &m,
            "plexus_requests_total",
            &["direction=\"outbound\"", "response_code=\"0\"", "response_flags=\"DC\""],
        );
        anyhow::ensure!(gone == 1.0, "requests recorded as the client's leaving: {gone}");
        Ok(m)
    })
    .await?;
    assert!(started.elapsed() < Duration::from_secs(3), "recorded only after the app answered");
    let answered = plexus_testkit::metric_sum(
        &gone,
        "plexus_requests_total",
        &["direction=\"outbound\"", "response_code=\"200\""],
    );
    assert_eq!(answered, 1.0, "the positive control's 200");
    Ok(())
}
