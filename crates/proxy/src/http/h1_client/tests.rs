//! The pool's own HTTP/1 connections against raw upstreams that misbehave on purpose.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::http::body;
use crate::http::client::{Dialer, Pool, Proto};

/// A raw upstream: each accepted connection is handed to `serve` with its number (from 0).
async fn upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicU32>)
where
    F: Fn(TcpStream, u32) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opened = Arc::new(AtomicU32::new(0));
    let count = opened.clone();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, n));
        }
    });
    (addr, opened)
}

/// Reads one request head (up to its blank line) from `s`; `None` at the end of the stream.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A raw upstream answering each request head, on every connection, with `answer(head)`.
async fn answering(answer: fn(&str) -> &'static [u8]) -> (SocketAddr, Arc<AtomicU32>) {
    upstream(move |mut s, _| async move {
        let mut buf = Vec::new();
        while let Some(head) = read_head(&mut s, &mut buf).await {
            if s.write_all(answer(&head)).await.is_err() {
                return;
            }
        }
    })
    .await
}

fn pool() -> Arc<Pool> {
    Pool::new(Dialer { timeout: Duration::from_secs(2), mark: None })
}

fn get(path: &str) -> Request<body::Body> {
    Request::get(path).header(http::header::HOST, "test").body(body::empty()).expect("request")
}

/// The status and body text of `req` sent through `pool` to `addr`.
async fn send(pool: &Arc<Pool>, addr: SocketAddr, req: Request<body::Body>) -> Result<(u16, String), String> {
    let resp = pool.send(addr, Proto::Http1, req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

#[tokio::test]
async fn an_answer_with_bytes_past_its_end_does_not_leave_its_connection_in_the_pool() {
    // Each connection answers its first request with a response followed by a second,
    // unasked one (a desynchronized upstream); a request on that connection would read it.
    let (addr, opened) = upstream(|mut s, n| async move {
        let mut buf = Vec::new();
        while read_head(&mut s, &mut buf).await.is_some() {
            let smuggled = if n == 0 { "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled" } else { "" };
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok{smuggled}");
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let pool = pool();
    assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "ok".into())));
    for _ in 0..3 {
        assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "ok".into())), "never the unasked answer");
    }
    assert_eq!(opened.load(Ordering::SeqCst), 2, "the first connection was closed, the second reused");
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    // Positive control and case: the upstream closes each connection after its first answer
    // (without saying so); the next request goes on a new connection and succeeds.
    let (addr, opened) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        }
    })
    .await;
    let pool = pool();
    for i in 1..=3 {
        assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "ok".into())));
        // Let the close reach us before the next request looks in the pool.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(opened.load(Ordering::SeqCst), i);
    }
}

#[tokio::test]
async fn an_early_answer_to_an_upload_is_returned() {
    // The upstream answers 413 after the head and closes without reading the body.
    let (addr, _) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig")
                .await;
        }
    })
    .await;
    let pool = pool();
    // A body that keeps coming: 4 MiB in 64 KiB frames.
    let frames = futures_frames(64, 64 * 1024);
    let req = Request::post("/upload").header(http::header::HOST, "test").body(frames).expect("request");
    assert_eq!(send(&pool, addr, req).await, Ok((413, "big".into())));
}

/// A request body of `count` frames of `size` bytes, of unknown length (sent chunked).
fn futures_frames(count: usize, size: usize) -> body::Body {
    let chunks = (0..count)
        .map(move |_| Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(vec![b'x'; size]))));
    body::boxed(http_body_util::StreamBody::new(tokio_stream::iter(chunks)))
}

#[tokio::test]
async fn bodies_stream_both_ways_at_once() {
    // An echo that answers as soon as the head arrives and echoes each chunk as it comes:
    // the response streams while the request body is still being sent.
    let (addr, _) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        let Some(head) = read_head(&mut s, &mut buf).await else { return };
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        if s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.is_err() {
            return;
        }
        // Relay the chunked request body as the chunked response body, byte for byte.
        loop {
            if buf.ends_with(b"0\r\n\r\n") || buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                let _ = s.write_all(&buf).await;
                return;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    buf.drain(..buf.len().saturating_sub(5));
                }
            }
        }
    })
    .await;
    let pool = pool();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>(1);
    let body = body::boxed(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let req = Request::post("/echo").header(http::header::HOST, "test").body(body).expect("request");
    let resp = pool.send(addr, Proto::Http1, req).await.expect("the head before the body ends");
    let mut echoed = resp.into_body();
    for piece in ["one", "two", "three"] {
        tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(piece)))).await.expect("send");
        let frame = tokio::time::timeout(Duration::from_secs(5), echoed.frame()).await.expect("echoed in time");
        let data = frame.expect("a frame").expect("no error").into_data().expect("data");
        assert_eq!(&data[..], piece.as_bytes(), "each piece comes back before the next is sent");
    }
    drop(tx);
    let rest = echoed.collect().await.expect("the end").to_bytes();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn informational_answers_are_skipped_and_a_switch_unasked_is_refused() {
    let (addr, _) = answering(|head| {
        if head.starts_with("GET /switch") {
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        } else {
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfine"
        }
    })
    .await;
    let pool = pool();
    assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "fine".into())));
    let refused = send(&pool, addr, get("/switch")).await;
    assert!(refused.as_ref().is_err_and(|e| e.contains("switched protocols unasked")), "{refused:?}");
}

#[tokio::test]
async fn an_ambiguous_answer_is_an_upstream_failure() {
    let (addr, opened) = answering(|head| {
        if head.starts_with("GET /ambiguous") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        }
    })
    .await;
    let pool = pool();
    assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "ok".into())), "positive control");
    let refused = send(&pool, addr, get("/ambiguous")).await;
    assert!(refused.as_ref().is_err_and(|e| e.contains("both Transfer-Encoding and Content-Length")), "{refused:?}");
    assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "ok".into())));
    assert_eq!(opened.load(Ordering::SeqCst), 2, "the connection that carried it was closed");
}

/// A failed HTTP/1 try gives its request's header map back (so a retry needs no copy of it):
/// when nothing answers at the address, and when the upstream closes without an answer, or
/// answers malformed. Positive control: an answer takes that map for its own fields.
#[tokio::test]
async fn a_failed_request_gives_its_headers_back() {
    let with_headers = || {
        let mut req = get("/");
        req.headers_mut().insert("x-kept", http::HeaderValue::from_static("1"));
        req
    };
    let expected = with_headers().headers().clone();
    let pool = pool();
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let nowhere = closed.local_addr().expect("addr");
    drop(closed);
    let (hangs_up, _) = upstream(|mut s, _| async move {
        let _ = read_head(&mut s, &mut Vec::new()).await;
    })
    .await;
    let (malformed, _) = answering(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n").await;
    for addr in [nowhere, hangs_up, malformed] {
        let Err(failed) = pool.try_send(addr, Proto::Http1, with_headers(), Default::default()).await else {
            panic!("{addr} answered");
        };
        assert_eq!(failed.headers.as_deref(), Some(&expected), "{addr}: {}", failed.error);
    }
    let (answers, _) = answering(|_| b"HTTP/1.1 200 OK\r\nx-answer: yes\r\ncontent-length: 2\r\n\r\nok").await;
    let resp = pool.try_send(answers, Proto::Http1, with_headers(), Default::default()).await.expect("answered");
    assert_eq!(resp.headers().get("x-answer").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    assert!(resp.headers().get("x-kept").is_none(), "the request's fields are gone from its map");
}

/// Answers without a body (to `HEAD`, `204`, `304`) followed, a moment later, by bytes that
/// look like the next answer: they arrive while the connection idles in the pool, which then
/// never sends a request on it — the next request gets its own answer, not the forged one.
#[tokio::test]
async fn bytes_after_a_bodiless_answer_are_never_the_next_answer() {
    for (method, first) in [
        (http::Method::HEAD, &b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n"[..]),
        (http::Method::GET, b"HTTP/1.1 204 No Content\r\ncontent-length: 6\r\n\r\n"),
        (http::Method::GET, b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
        (http::Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ] {
        let (addr, opened) = upstream(move |mut s, _| async move {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf).await {
                if head.starts_with("GET /next") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nreal").await;
                    continue;
                }
                let _ = s.write_all(first).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged").await;
            }
        })
        .await;
        let pool = pool();
        let req = Request::builder().method(method.clone()).uri("/first").header(http::header::HOST, "test");
        let resp = send(&pool, addr, req.body(body::empty()).expect("request")).await;
        assert!(resp.as_ref().is_ok_and(|(_, text)| !text.contains("forged")), "{method} {first:?}: {resp:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(send(&pool, addr, get("/next")).await, Ok((200, "real".into())), "{method} {first:?}");
        assert_eq!(opened.load(Ordering::SeqCst), 2, "{first:?}: the connection the bytes came on was not reused");
    }
}

/// A request's trailers are not sent to an HTTP/1 upstream (the proxy strips the `Trailer`
/// field that would announce them, and an app need not take a trailer section: hyper's client
/// sent none either); the body ends with its last chunk, and its data arrive whole.
#[tokio::test]
async fn request_trailers_are_not_sent_to_an_http1_upstream() {
    let (addr, _) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        let Some(_) = read_head(&mut s, &mut buf).await else { return };
        while !buf.ends_with(b"\r\n\r\n") || !buf.windows(3).any(|w| w == b"\n0\r") {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", buf.len());
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.write_all(&buf).await;
    })
    .await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
    trailers.insert("x-forwarded-client-cert", http::HeaderValue::from_static("forged"));
    let frames = [http_body::Frame::data(bytes::Bytes::from("hello")), http_body::Frame::trailers(trailers)];
    let body =
        body::boxed(http_body_util::StreamBody::new(tokio_stream::iter(frames.map(Ok::<_, std::convert::Infallible>))));
    let req = Request::post("/up").header(http::header::HOST, "test").body(body).expect("request");
    let (status, seen) = send(&pool(), addr, req).await.expect("answered");
    assert_eq!((status, seen.as_str()), (200, "5\r\nhello\r\n0\r\n\r\n"));
}

/// A flood of interim answers before the final one: each is read and dropped as it comes (the
/// read buffer holds at most one head at a time, never the flood), and the final answer is
/// returned; a flood with no end is an upstream that has not answered, bounded by the request's
/// timeout like any other.
#[tokio::test]
async fn a_flood_of_interim_answers_is_read_through() {
    let (addr, _) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        while read_head(&mut s, &mut buf).await.is_some() {
            let flood = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n".repeat(20_000);
            let _ = s.write_all(&flood).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfine").await;
        }
    })
    .await;
    let pool = pool();
    assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "fine".into())));
    // The connection carries the next request (the flood was read to its end).
    assert_eq!(send(&pool, addr, get("/")).await, Ok((200, "fine".into())));
}
