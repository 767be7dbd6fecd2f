//! The proxy's own HTTP/1 server against raw clients on an in-memory pipe.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::*;
use crate::http::body;
use crate::http::body::tests::Frames;

/// A future the connection can keep inline.
type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Echoes the request: method, target and body (read whole) in the response body; a
/// request to `/unread` is answered without reading its body, `/chunked` streams its answer.
fn echo(req: Request<ReceivedBody>) -> Answer {
    Box::pin(async move {
        let (parts, body) = req.into_parts();
        if parts.uri.path() == "/unread" {
            return Response::new(body::full("not read"));
        }
        if parts.uri.path() == "/empty" {
            return Response::new(body::empty());
        }
        let got = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let mut r = Response::new(body::full(format!("body failed: {e}")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            }
        };
        let text = format!("{} {} {}", parts.method, parts.uri, String::from_utf8_lossy(&got));
        if parts.uri.path() == "/trailers" {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
            let frames = Frames(vec![Frame::data(Bytes::from(text)), Frame::trailers(trailers)].into());
            return Response::new(body::boxed(frames));
        }
        if parts.uri.path() == "/big" {
            // Frames larger than the write buffer's high-water mark, of no announced size.
            let pieces = [vec![b'a'; 40_000], vec![b'b'; 40_000], b"end".to_vec()];
            return Response::new(body::boxed(Pieces(pieces.into_iter().map(Bytes::from).collect())));
        }
        if parts.uri.path() == "/chunked" {
            let pieces = text.into_bytes().chunks(3).map(Bytes::copy_from_slice).collect();
            return Response::new(body::boxed(Pieces(pieces)));
        }
        Response::new(body::full(text))
    })
}

/// A body of several frames, of no announced size.
struct Pieces(std::collections::VecDeque<Bytes>);

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// A connection served on one end of a pipe; the other end is returned.
fn serve(max_head: usize) -> (DuplexStream, tokio::task::JoinHandle<(io::Result<()>, bool, BytesMut)>) {
    serve_on(1 << 20, max_head)
}

/// [`serve`] on a pipe holding at most `capacity` bytes (writes beyond it wait for the reader).
fn serve_on(
    capacity: usize,
    max_head: usize,
) -> (DuplexStream, tokio::task::JoinHandle<(io::Result<()>, bool, BytesMut)>) {
    let (client, server) = tokio::io::duplex(capacity);
    let task = tokio::spawn(async move {
        let mut conn = Connection::new(server, echo, limits(max_head));
        let r = (&mut conn).await;
        let handed_off = conn.handed_off();
        let (_, rest, _) = conn.into_parts();
        (r, handed_off, rest)
    });
    (client, task)
}

/// Reads until the peer closes (or 2 s pass).
async fn read_to_close(c: &mut DuplexStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response whose body is `content-length` framed.
async fn read_response(c: &mut DuplexStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed within a response: {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |l| l.trim().parse::<usize>().expect("length"));
            if out.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// Reads until what was read ends with `end`.
async fn read_until(c: &mut DuplexStream, end: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).ends_with(end) {
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await.expect("in time").expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn keep_alive_serves_requests_in_turn_and_pipelined() {
    let (mut c, task) = serve(8192);
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let first = read_response(&mut c).await;
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(first.contains("\r\ndate: ") && first.ends_with("GET /a "), "{first}");
    // Two requests in one write: both answered, in order.
    c.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let both = read_until(&mut c, "GET /c ").await;
    assert!(both.contains("\r\n\r\nPOST /b abcHTTP/1.1 200 OK\r\n"), "{both}");
    c.write_all(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let last = read_to_close(&mut c).await;
    assert!(last.contains("connection: close\r\n") && last.ends_with("GET /last "), "{last}");
    let (r, handed_off, _) = task.await.expect("task");
    assert!(r.is_ok() && !handed_off);
}

#[tokio::test]
async fn a_chunked_upload_streams_and_a_chunked_answer_is_framed() {
    let (mut c, task) = serve(8192);
    c.write_all(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.write_all(b"2\r\nde\r\n0\r\n\r\n").await.expect("write");
    c.shutdown().await.expect("half close");
    let out = read_to_close(&mut c).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n") && out.contains("transfer-encoding: chunked\r\n"), "{out}");
    let body = &out[out.find("\r\n\r\n").expect("head") + 4..];
    let decoded: String = body.split("\r\n").skip(1).step_by(2).collect();
    assert_eq!(decoded, "POST /chunked abcde");
    assert!(body.ends_with("0\r\n\r\n"), "{body}");
    assert!(task.await.expect("task").0.is_ok());
}

#[tokio::test]
async fn expect_continue_is_answered_when_the_body_is_read() {
    let (mut c, _task) = serve(8192);
    c.write_all(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await.expect("in time").expect("read");
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"ok").await.expect("write");
    let out = read_response(&mut c).await;
    assert!(out.ends_with("POST /e ok"), "{out}");
}

/// A request answered without its body being read (refused) gets its answer and no `100
/// Continue` (its client never sends the body); one whose `Expect` holds no body gets none
/// either; on HTTP/1.0 `Expect` means nothing.
#[tokio::test]
async fn expect_continue_is_not_answered_for_a_body_never_read() {
    for raw in [
        &b"POST /unread HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n"[..],
        b"POST /unread HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    ] {
        let (mut c, _task) = serve(8192);
        c.write_all(raw).await.expect("write");
        let out = read_to_close(&mut c).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("not read"), "{out}");
        assert!(!out.contains("100 Continue") && out.contains("connection: close\r\n"), "{out}");
    }
    // No body to wait for: answered at once, no interim answer, and the connection stays open.
    let (mut c, _task) = serve(8192);
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n").await.expect("write");
    let out = read_response(&mut c).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("GET /a "), "{out}");
    c.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert!(read_response(&mut c).await.ends_with("GET /b "));
    // HTTP/1.0: the body is read without an interim answer (the client sends it unasked).
    let (mut c, _task) = serve(8192);
    c.write_all(b"POST /e HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n").await.expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.write_all(b"ok").await.expect("write");
    let out = read_to_close(&mut c).await;
    assert!(out.starts_with("HTTP/1.0 200 OK\r\n") && out.ends_with("POST /e ok"), "{out}");
}

/// A request body cut short by its client (it shuts down its sending side within it) or
/// broken in its chunking fails for its reader, and the connection carries nothing after it:
/// the bytes that follow are never read as a request.
#[tokio::test]
async fn a_body_cut_short_or_broken_fails_and_ends_the_connection() {
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for (raw, close) in [
        ("POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello".to_string(), true),
        ("POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_string(), true),
        ("POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello".to_string(), true),
        (
            format!(
                "POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n{smuggled}"
            ),
            false,
        ),
        (
            format!("POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n{smuggled}"),
            false,
        ),
        (
            format!("POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n{smuggled}"),
            false,
        ),
    ] {
        let (mut c, task) = serve(8192);
        c.write_all(raw.as_bytes()).await.expect("write");
        if close {
            c.shutdown().await.expect("shut down");
        }
        let out = read_to_close(&mut c).await;
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n") && out.contains("body failed"), "{raw:?}: {out}");
        assert!(!out.contains("smuggled") && out.matches("HTTP/1.1").count() == 1, "{raw:?}: {out}");
        // The connection lingers (reading what the client still sends) until the client closes.
        drop(c);
        assert!(task.await.expect("task").0.is_ok());
    }
    // Positive control: the same bodies whole, and the request after them served.
    let (mut c, _task) = serve(8192);
    let whole =
        format!("POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}");
    c.write_all(whole.as_bytes()).await.expect("write");
    let out = read_until(&mut c, "GET /smuggled ").await;
    assert!(out.contains("POST /e hello") && out.matches("HTTP/1.1 200 OK").count() == 2, "{out}");
}

#[tokio::test]
async fn a_body_the_handler_did_not_read_closes_the_connection() {
    let (mut c, task) = serve(8192);
    // Its "body" holds a request: never served.
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let head = format!("POST /unread HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", smuggled.len() + 10);
    c.write_all(head.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The connection may be closed already.
    let _ = c.write_all(smuggled.as_bytes()).await;
    let out = read_to_close(&mut c).await;
    assert!(out.contains("not read") && !out.contains("smuggled"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
    drop(c);
    assert!(task.await.expect("task").0.is_ok());
}

#[tokio::test]
async fn malformed_and_oversized_heads_are_refused_and_closed() {
    for (raw, status) in [
        (&b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"[..], "400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", "400"),
        (b"\x00\x01 nonsense\r\n\r\n", "400"),
    ] {
        let (mut c, _task) = serve(8192);
        c.write_all(raw).await.expect("write");
        let out = read_to_close(&mut c).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{raw:?}: {out}");
        assert!(out.contains("x-plexus-error: ") && out.contains("connection: close\r\n"), "{out}");
    }
    let (mut c, _task) = serve(8192);
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    c.write_all(big.as_bytes()).await.expect("write");
    assert!(read_to_close(&mut c).await.starts_with("HTTP/1.1 431 "));
    // The same head is served under a larger limit (positive control).
    let (mut c, _task) = serve(16384);
    c.write_all(big.as_bytes()).await.expect("write");
    assert!(read_response(&mut c).await.starts_with("HTTP/1.1 200 "));
}

#[tokio::test]
async fn upgrades_and_connect_are_handed_off_with_their_head_unread() {
    for head in [
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ] {
        let (mut c, task) = serve(8192);
        c.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert!(read_response(&mut c).await.ends_with("GET /first "));
        c.write_all(head.as_bytes()).await.expect("write");
        let (r, handed_off, rest) = task.await.expect("task");
        assert!(r.is_ok() && handed_off, "{head}");
        assert_eq!(&rest[..], head.as_bytes());
    }
    // Bytes pipelined right behind the head (a WebSocket frame, a TLS ClientHello through the
    // tunnel, even another request) are handed off with it, in order, none read as a request.
    for head in [
        &b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"[..],
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01\x00\x05hello",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let (mut c, task) = serve(8192);
        c.write_all(head).await.expect("write");
        let (r, handed_off, rest) = task.await.expect("task");
        assert!(r.is_ok() && handed_off, "{head:?}");
        assert_eq!(&rest[..], head);
        let mut nothing = [0u8; 1];
        let answered = tokio::time::timeout(Duration::from_millis(50), c.read(&mut nothing)).await;
        assert!(answered.is_err() || answered.is_ok_and(|n| n.is_ok_and(|n| n == 0)), "{head:?}: answered");
    }
    // A non-WebSocket upgrade is served as a plain request (the proxy strips it).
    let (mut c, _task) = serve(8192);
    c.write_all(b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n").await.expect("write");
    assert!(read_response(&mut c).await.ends_with("GET /h2c "));
}

#[tokio::test]
async fn http10_and_head_answers_are_framed_for_their_request() {
    let (mut c, _task) = serve(8192);
    c.write_all(b"GET /chunked HTTP/1.0\r\n\r\n").await.expect("write");
    let out = read_to_close(&mut c).await;
    assert!(out.starts_with("HTTP/1.0 200 OK\r\n") && !out.contains("chunked\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nGET /chunked "), "{out}");

    let (mut c, _task) = serve(8192);
    c.write_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await.expect("write");
    let out = read_response(&mut c).await;
    assert!(out.contains("connection: keep-alive\r\n") && out.ends_with("GET /a "), "{out}");

    let (mut c, _task) = serve(8192);
    c.write_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let out = read_until(&mut c, "GET /after ").await;
    // The HEAD answer declares the length of the body it does not send.
    assert!(out.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 8\r\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
}

/// An empty body says nothing of the size a `GET` would get (a proxied `HEAD` answer is
/// always empty): the answer to a `HEAD` request then declares no length, as hyper's did,
/// where the answer to a `GET` declares its 0.
#[tokio::test]
async fn a_head_answer_with_an_empty_body_declares_no_length() {
    let (mut c, _task) = serve(8192);
    c.write_all(b"HEAD /empty HTTP/1.1\r\nHost: x\r\n\r\nGET /empty HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut out = read_until(&mut c, "\r\n\r\n").await;
    if out.matches("\r\n\r\n").count() < 2 {
        out += &read_until(&mut c, "\r\n\r\n").await;
    }
    let (head, get) = out.split_at(out.rfind("HTTP/1.1 200").expect("two answers"));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("content-length"), "{out}");
    assert!(get.starts_with("HTTP/1.1 200 OK\r\n") && get.contains("content-length: 0\r\n"), "{out}");
    // HTTP/1.0 likewise.
    let (mut c, _task) = serve(8192);
    c.write_all(b"HEAD /empty HTTP/1.0\r\n\r\n").await.expect("write");
    let out = read_to_close(&mut c).await;
    assert!(out.starts_with("HTTP/1.0 200 OK\r\n") && !out.contains("content-length"), "{out}");
}

#[tokio::test]
async fn graceful_shutdown_ends_an_idle_connection_at_once() {
    let (client, server) = tokio::io::duplex(4096);
    let mut conn = Connection::new(server, echo, limits(8192));
    conn.graceful_shutdown();
    let done = tokio::time::timeout(Duration::from_secs(1), &mut conn).await.expect("ended at once");
    assert!(done.is_ok());
    drop(client);
}

#[tokio::test]
async fn trailers_end_a_chunked_answer_and_the_connection_stays_open() {
    let (mut c, _task) = serve(8192);
    c.write_all(b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n").await.expect("write");
    let out = read_until(&mut c, "\r\n0\r\nx-checksum: abc\r\n\r\n").await;
    assert!(out.contains("transfer-encoding: chunked\r\n") && out.contains("GET /trailers "), "{out}");
    // The same connection serves the next request (positive control of the framing).
    c.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert!(read_response(&mut c).await.ends_with("GET /next "));
}

/// Chunks larger than the write buffer go out from their own buffers; when the client reads
/// slower than the proxy writes, each still ends with its CRLF, in order, and the connection
/// then serves the next request.
#[tokio::test]
async fn large_chunks_to_a_slow_reader_keep_their_framing() {
    let (mut c, _task) = serve_on(4096, 8192);
    c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let out = read_until(&mut c, "\r\n0\r\n\r\n").await;
    let (head, mut rest) = out.split_once("\r\n\r\n").expect("head");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size, 16).expect("hex chunk size");
        if size == 0 {
            assert_eq!(after, "\r\n", "the last chunk ends the answer");
            break;
        }
        body.push_str(&after[..size]);
        assert_eq!(&after[size..size + 2], "\r\n", "a chunk ends with CRLF");
        rest = &after[size + 2..];
    }
    assert_eq!(body, format!("{}{}end", "a".repeat(40_000), "b".repeat(40_000)));
    c.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert!(read_response(&mut c).await.ends_with("GET /next "));
}

/// An answer given while the client is still sending (a refused head, a body the handler did
/// not read) is followed by a lingering close: what the client still sends is read and
/// discarded — so that the kernel does not reset the connection, and destroy the answer, before
/// the client has read it — and nothing of it is served.
#[tokio::test]
async fn an_early_answer_is_followed_by_a_lingering_close() {
    let cases: [(&[u8], &str); 2] = [
        (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400"),
        (b"POST /unread HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n", "HTTP/1.1 200"),
    ];
    for (head, status) in cases {
        let (c, task) = serve_on(4096, 8192);
        let (mut rd, mut wr) = tokio::io::split(c);
        wr.write_all(head).await.expect("head");
        // The client goes on sending (its body, or what it meant as one) while it reads.
        let sender = tokio::spawn(async move {
            let chunk = vec![b'x'; 16 * 1024];
            for _ in 0..8 {
                wr.write_all(&chunk).await?;
            }
            wr.shutdown().await
        });
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await.expect("in time").expect("read");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with(status) && text.contains("connection: close"), "{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "nothing of the rest served: {text}");
        sender.await.expect("sender").expect("every byte the client sent was taken");
        let (r, handed_off, _) = task.await.expect("task");
        assert!(r.is_ok() && !handed_off, "{r:?}");
    }
}

/// A handler that answers only when told, and says when it is dropped unanswered.
fn slow_handler(
    release: Arc<tokio::sync::Notify>,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
) -> impl Fn(Request<ReceivedBody>) -> Answer + Unpin {
    struct Counted(Arc<std::sync::atomic::AtomicUsize>, bool);
    impl Drop for Counted {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    move |req: Request<ReceivedBody>| {
        let (release, dropped) = (release.clone(), dropped.clone());
        Box::pin(async move {
            let mut guard = Counted(dropped, false);
            release.notified().await;
            guard.1 = true;
            Response::new(body::full(req.uri().path().to_string()))
        }) as Answer
    }
}

/// Over loopback TCP: a client that resets its connection (`SO_LINGER` 0) while its request is
/// being answered has its handler dropped at once (the upstream request cancelled); a client
/// that half-closes instead, and one that pipelines a second request meanwhile, are answered
/// (positive controls).
#[tokio::test]
async fn a_client_reset_mid_request_drops_its_handler_and_a_half_close_does_not() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let release = Arc::new(tokio::sync::Notify::new());
    let dropped = Arc::new(AtomicUsize::new(0));
    let handler = slow_handler(release.clone(), dropped.clone());
    let server = tokio::spawn(async move {
        let handler = Arc::new(handler);
        let mut served = Vec::new();
        for _ in 0..3 {
            let (socket, _) = listener.accept().await.expect("accept");
            let handler = handler.clone();
            served.push(tokio::spawn(async move {
                let mut conn = Connection::new(socket, move |r| handler(r), limits(8192));
                (&mut conn).await
            }));
        }
        served
    });

    // Reset: the handler is dropped without being released.
    let mut reset = tokio::net::TcpStream::connect(addr).await.expect("connect");
    reset.write_all(b"GET /reset HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 0, "dropped before the client left");
    reset.set_zero_linger().expect("linger");
    drop(reset);
    for _ in 0..200 {
        if dropped.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the reset client's handler still runs");

    // Half-close: still answered once the handler is released.
    let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /half HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("send");
    half.shutdown().await.expect("half close");
    // Pipelined: a second request sent while the first is answered.
    let mut pipelined = tokio::net::TcpStream::connect(addr).await.expect("connect");
    pipelined.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    pipelined.write_all(b"GET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "a half-close or pipelined request dropped a handler");
    let releaser = tokio::spawn(async move {
        loop {
            release.notify_waiters();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut answer)).await.expect("in time").expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("/half"), "{answer:?}");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), pipelined.read_to_end(&mut answer))
        .await
        .expect("in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("/first") && answer.ends_with("/second"), "{answer:?}");
    releaser.abort();
    for conn in server.await.expect("server") {
        let _ = conn.await;
    }
}
