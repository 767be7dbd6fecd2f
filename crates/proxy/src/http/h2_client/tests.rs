//! The pool's HTTP/2 client against real HTTP/2 servers: hyper's, and h2's own where a test
//! needs to control the frames (refusing or watching a stream, not answering PINGs).

use std::sync::atomic::AtomicU32;

use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::*;
use crate::http::body;
use crate::http::client::tests::until;
use crate::http::client::{Dialer, Pool, Proto};

fn dialer() -> Dialer {
    Dialer { timeout: Duration::from_secs(2), mark: None }
}

fn get(path: &str) -> Request<Body> {
    Request::get(format!("http://test{path}")).body(body::empty()).expect("request")
}

/// A server that runs `conn` on every HTTP/2 connection it accepts (h2's server), counting them.
async fn h2_server<F, Fut>(conn: F) -> (SocketAddr, Arc<AtomicU32>)
where
    F: Fn(h2::server::Connection<TcpStream, Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opened = Arc::new(AtomicU32::new(0));
    let counted = opened.clone();
    let conn = Arc::new(conn);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let conn = conn.clone();
            tokio::spawn(async move {
                if let Ok(c) = h2::server::handshake(stream).await {
                    conn(c).await;
                }
            });
        }
    });
    (addr, opened)
}

/// Answers every request on `conn` with `200` and `body`, until the connection ends.
async fn answer_all(mut conn: h2::server::Connection<TcpStream, Bytes>, body: &'static [u8]) {
    while let Some(Ok((_req, mut respond))) = conn.accept().await {
        if let Ok(mut tx) = respond.send_response(Response::new(()), false) {
            let _ = tx.send_data(Bytes::from_static(body), true);
        }
    }
}

/// hyper's HTTP/2 server, answering with `service`.
async fn hyper_server<S, Fut>(service: S) -> SocketAddr
where
    S: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(service))
                    .await;
            });
        }
    });
    addr
}

/// A request body fed frame by frame through the returned sender.
fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, crate::BoxError>>, Body) {
    let (tx, rx) = mpsc::channel(4);
    (tx, body::boxed(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))))
}

async fn next_data(body: &mut crate::http::client::UpstreamBody) -> Bytes {
    let frame = body.frame().await.expect("a frame").expect("not an error");
    frame.into_data().expect("data")
}

#[tokio::test]
async fn bodies_stream_both_ways_with_trailers() {
    // hyper's server echoes the request body (and its trailers) as it comes, then its own trailers.
    let addr = hyper_server(|req: Request<hyper::body::Incoming>| async move {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, crate::BoxError>>(4);
        tokio::spawn(async move {
            let mut body = req.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(t) = frame.trailers_ref() {
                    let mut t = t.clone();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    let _ = tx.send(Ok(Frame::trailers(t))).await;
                    return;
                }
                let _ = tx.send(Ok(frame)).await;
            }
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            let _ = tx.send(Ok(Frame::trailers(t))).await;
        });
        let body = body::boxed(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        Ok(Response::new(body))
    })
    .await;
    let pool = Pool::new(dialer());
    let (tx, req_body) = channel_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"ping 1")))).await.expect("send");
    let req = Request::post("http://test/echo").body(req_body).expect("request");
    // The response head comes while the request body is still open (bidirectional streaming).
    let resp = pool.send(addr, Proto::Http2, req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    assert_eq!(next_data(&mut body).await, "ping 1");
    tx.send(Ok(Frame::data(Bytes::from_static(b"ping 2")))).await.expect("send");
    assert_eq!(next_data(&mut body).await, "ping 2");
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sent", HeaderValue::from_static("2"));
    tx.send(Ok(Frame::trailers(trailers))).await.expect("send");
    drop(tx);
    let frame = body.frame().await.expect("trailers").expect("not an error");
    let trailers = frame.into_trailers().expect("trailers");
    assert_eq!(trailers["x-sent"], "2", "the request's trailers reached the server");
    assert_eq!(trailers["grpc-status"], "0", "the response's trailers reached the client");
    assert!(body.frame().await.is_none());
    assert!(http_body::Body::is_end_stream(&body));

    // A whole body (no task of its own) arrives with its length.
    let req = Request::put("http://test/echo").body(body::full("whole")).expect("request");
    let resp = pool.send(addr, Proto::Http2, req).await.expect("response");
    let collected = resp.into_body().collect().await.expect("body");
    assert_eq!(collected.trailers().expect("trailers")["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "whole");
}

#[tokio::test]
async fn a_response_larger_than_both_windows_arrives_whole() {
    const SIZE: usize = 10 * 1024 * 1024;
    let addr = hyper_server(|req: Request<hyper::body::Incoming>| async move {
        // Uploads are counted; downloads are 10 MiB.
        if req.method() == Method::POST {
            let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
            return Ok(Response::new(body::full(n.to_string())));
        }
        Ok(Response::new(body::full(vec![7u8; SIZE])))
    })
    .await;
    let pool = Pool::new(dialer());
    let resp = pool.send(addr, Proto::Http2, get("/big")).await.expect("response");
    assert_eq!(http_body::Body::size_hint(resp.body()).exact(), Some(SIZE as u64));
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(got.len(), SIZE);
    assert!(got.iter().all(|b| *b == 7));
    // And the other way: a 10 MiB request body, within the server's windows.
    let req = Request::post("http://test/up").body(body::full(vec![1u8; SIZE])).expect("request");
    let resp = pool.send(addr, Proto::Http2, req).await.expect("response");
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), SIZE.to_string());
}

#[tokio::test]
async fn a_connection_the_server_closed_is_replaced() {
    // Each connection serves one request, then the server sends GOAWAY and closes it.
    let (addr, opened) = h2_server(|mut conn| async move {
        if let Some(Ok((_req, mut respond))) = conn.accept().await
            && let Ok(mut tx) = respond.send_response(Response::new(()), false)
        {
            let _ = tx.send_data(Bytes::from_static(b"ok"), true);
        }
        conn.graceful_shutdown();
        while let Some(Ok(_)) = conn.accept().await {}
    })
    .await;
    let pool = Pool::new(dialer());
    for i in 1..=3 {
        let resp = pool.send(addr, Proto::Http2, get("/")).await.expect("response");
        assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
        assert_eq!(opened.load(Ordering::SeqCst), i, "request {i} on a connection of its own");
        until("the pool saw the connection end", || pool.open_h2_count() == 0).await;
    }
}

/// A GOAWAY while a response is still streaming: the connection stays up for that stream, and
/// the next request, which it no longer takes, goes on a new connection.
#[tokio::test]
async fn a_request_the_connection_no_longer_takes_goes_on_a_new_one() {
    let (addr, opened) = h2_server(|mut conn| async move {
        let Some(Ok((req, mut respond))) = conn.accept().await else { return };
        if req.uri().path() != "/long" {
            if let Ok(mut tx) = respond.send_response(Response::new(()), false) {
                let _ = tx.send_data(Bytes::from_static(b"ok"), true);
            }
            return answer_all(conn, b"ok").await;
        }
        let Ok(mut tx) = respond.send_response(Response::new(()), false) else { return };
        let _ = tx.send_data(Bytes::from_static(b"first"), false);
        conn.graceful_shutdown();
        // Driven until the long response's stream ends (never, in this test).
        while let Some(Ok(_)) = conn.accept().await {}
        drop(tx);
    })
    .await;
    let pool = Pool::new(dialer());
    let long = pool.send(addr, Proto::Http2, get("/long")).await.expect("response");
    let mut long = long.into_body();
    assert_eq!(next_data(&mut long).await, "first");
    until("the client saw the GOAWAY", || pool.h2_connections().iter().all(|c| !c.takes_streams())).await;
    assert_eq!(pool.open_h2_count(), 1, "the connection is still up for its stream");
    let resp = pool.send(addr, Proto::Http2, get("/")).await.expect("response");
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
    assert_eq!(opened.load(Ordering::SeqCst), 2, "a new connection");
    // The pool holds the new one, which serves the next request too.
    let resp = pool.send(addr, Proto::Http2, get("/")).await.expect("response");
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_stream_is_an_upstream_reset() {
    let (addr, opened) = h2_server(|mut conn| async move {
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            if req.uri().path() == "/refuse" {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            } else if let Ok(mut tx) = respond.send_response(Response::new(()), false) {
                let _ = tx.send_data(Bytes::from_static(b"ok"), true);
            }
        }
    })
    .await;
    let pool = Pool::new(dialer());
    for _ in 0..2 {
        match pool.send(addr, Proto::Http2, get("/refuse")).await {
            Err(ProxyError::UpstreamReset(msg)) => assert!(msg.contains("refused"), "{msg}"),
            other => panic!("expected an upstream reset, got {:?}", other.map(|r| r.status())),
        }
        // The connection still serves the next request.
        let resp = pool.send(addr, Proto::Http2, get("/")).await.expect("response");
        assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
    }
    assert_eq!(opened.load(Ordering::SeqCst), 1, "a refused stream does not end the connection");
}

/// How the server saw its next stream end.
async fn reset(resets: &mut mpsc::UnboundedReceiver<Option<h2::Reason>>) -> Option<h2::Reason> {
    let next = tokio::time::timeout(Duration::from_secs(5), resets.recv()).await;
    next.expect("the server saw the stream reset").expect("the server is up")
}

#[tokio::test]
async fn a_response_body_dropped_early_resets_the_stream() {
    // The server answers with a head and one chunk, then reports how the stream ended.
    let (resets_tx, mut resets) = mpsc::unbounded_channel::<Option<h2::Reason>>();
    let (addr, _) = h2_server(move |mut conn| {
        let resets = resets_tx.clone();
        async move {
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let resets = resets.clone();
                tokio::spawn(async move {
                    let Ok(mut tx) = respond.send_response(Response::new(()), false) else { return };
                    let _ = tx.send_data(Bytes::from_static(b"first"), false);
                    if req.uri().path() == "/whole" {
                        let _ = tx.send_data(Bytes::from_static(b" and last"), true);
                        return;
                    }
                    let reason = poll_fn(|cx| tx.poll_reset(cx)).await.ok();
                    let _ = resets.send(reason);
                });
            }
        }
    })
    .await;
    let pool = Pool::new(dialer());
    // An empty request body.
    let resp = pool.send(addr, Proto::Http2, get("/stream")).await.expect("response");
    let mut body = resp.into_body();
    assert_eq!(next_data(&mut body).await, "first");
    drop(body);
    assert_eq!(reset(&mut resets).await, Some(h2::Reason::CANCEL));
    // A request body still streaming when the response is dropped: its pipe is stopped too.
    let (tx, req_body) = channel_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"up")))).await.expect("send");
    let req = Request::post("http://test/stream").body(req_body).expect("request");
    let resp = pool.send(addr, Proto::Http2, req).await.expect("response");
    let mut body = resp.into_body();
    assert_eq!(next_data(&mut body).await, "first");
    drop(body);
    assert_eq!(reset(&mut resets).await, Some(h2::Reason::CANCEL));
    // Positive control: a response read to its end on the same connection.
    let resp = pool.send(addr, Proto::Http2, get("/whole")).await.expect("response");
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "first and last");
}

#[tokio::test]
async fn a_connection_without_pong_is_closed() {
    let keep_alive = KeepAlive { interval: Duration::from_millis(100), timeout: Duration::from_millis(100) };
    // Positive control: a server that answers PINGs keeps its connection through many intervals.
    let (addr, opened) = h2_server(|conn| answer_all(conn, b"ok")).await;
    let pool = Pool::with_keep_alive(dialer(), keep_alive);
    for _ in 0..3 {
        let resp = pool.send(addr, Proto::Http2, get("/")).await.expect("response");
        assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(opened.load(Ordering::SeqCst), 1, "PONGs came back: one connection");

    // Its first connection takes a request and then stops reading (no PONG ever); later ones answer.
    let (addr, opened) = h2_server(|mut conn| async move {
        let first = conn.accept().await;
        if first.as_ref().is_some_and(|r| r.as_ref().is_ok_and(|(req, _)| req.uri().path() == "/hang")) {
            std::future::pending::<()>().await;
        }
        if let Some(Ok((_req, mut respond))) = first
            && let Ok(mut tx) = respond.send_response(Response::new(()), false)
        {
            let _ = tx.send_data(Bytes::from_static(b"ok"), true);
        }
        answer_all(conn, b"ok").await;
    })
    .await;
    let pool = Pool::with_keep_alive(dialer(), keep_alive);
    let hung = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, Proto::Http2, get("/hang")))
        .await
        .expect("the keep-alive ended the request");
    assert!(matches!(hung, Err(ProxyError::Timeout)), "a keep-alive timeout, got {:?}", hung.map(|r| r.status()));
    let resp = pool.send(addr, Proto::Http2, get("/")).await.expect("response");
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
    assert_eq!(opened.load(Ordering::SeqCst), 2, "the silent connection was not handed out again");
}

/// A connection the pool lets go of (its endpoint left the mesh) closes once its requests
/// are done: its task, keep-alive included, does not outlive the pool's handle.
#[tokio::test]
async fn a_connection_the_pool_drops_closes() {
    let closed = Arc::new(AtomicU32::new(0));
    let counted = closed.clone();
    let (addr, opened) = h2_server(move |conn| {
        let closed = counted.clone();
        async move {
            answer_all(conn, b"ok").await;
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let keep_alive = KeepAlive { interval: Duration::from_millis(50), timeout: Duration::from_secs(1) };
    let pool = Pool::with_keep_alive(dialer(), keep_alive);
    let resp = pool.send(addr, Proto::Http2, get("/")).await.expect("response");
    // Kept while a response streams and the endpoint is live.
    pool.retain(|_| true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(closed.load(Ordering::SeqCst), 0, "the pool still holds it");
    pool.retain(|a| *a != addr);
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok", "its response is read to the end");
    until("the connection closed", || closed.load(Ordering::SeqCst) == 1).await;
    assert_eq!(opened.load(Ordering::SeqCst), 1);
}

#[test]
fn a_body_of_known_size_gets_its_content_length() {
    let with = |method: Method, body: Body, headers: &[(&'static str, &'static str)]| {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_static(v));
        }
        set_content_length(&method, &mut map, &body);
        map.get(header::CONTENT_LENGTH).map(|v| v.to_str().expect("ascii").to_string())
    };
    assert_eq!(with(Method::POST, body::full("hello"), &[]).as_deref(), Some("5"));
    assert_eq!(with(Method::POST, body::empty(), &[]).as_deref(), Some("0"), "POST carries a payload");
    assert_eq!(with(Method::GET, body::empty(), &[]), None, "no zero length where no payload is defined");
    assert_eq!(with(Method::DELETE, body::full("x"), &[]).as_deref(), Some("1"));
    assert_eq!(with(Method::PUT, body::full("hello"), &[("content-length", "5")]).as_deref(), Some("5"));
    let (_tx, streaming) = channel_body();
    assert_eq!(with(Method::POST, streaming, &[]), None, "a streaming body's size is not known");
}

/// A TCP relay to `to` that counts the bytes its clients send.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(to).await else { return };
            let counted = counted.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut cr, &mut buf).await {
                        if n == 0 || tokio::io::AsyncWriteExt::write_all(&mut sw, &buf[..n]).await.is_err() {
                            break;
                        }
                        counted.fetch_add(n, Ordering::SeqCst);
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                let _ = tokio::join!(up, down);
            });
        }
    });
    (addr, sent)
}

/// The stamped `x-request-id` and `traceparent` (sensitive: never indexed) name HPACK's
/// dynamic table once a connection's first request has sent them indexable: the following
/// requests' heads are shorter by the two names, against a connection whose first request
/// had neither. Any other sensitive field stays never indexed.
#[tokio::test]
async fn the_stamped_trace_fields_are_named_by_index_after_the_first_request() {
    let (server, _) = h2_server(|conn| answer_all(conn, b"ok")).await;
    let request = |i: u32, stamped: bool| {
        let mut req = get("/");
        let mut fields = vec![("authorization", "Bearer secret".to_string())];
        if stamped {
            fields.push(("x-request-id", format!("{i:032x}")));
            fields.push(("traceparent", format!("00-{i:032x}-{i:016x}-01")));
        }
        for (name, value) in fields {
            let mut value = HeaderValue::from_str(&value).expect("value");
            value.set_sensitive(true);
            req.headers_mut().insert(name, value);
        }
        req
    };
    // The bytes of each request's head after the first, on a connection whose first request
    // carried the stamped fields (`primed`) or not.
    let heads = |primed: bool| async move {
        let (addr, sent) = counting_relay(server).await;
        let pool = Pool::new(dialer());
        let mut sizes = Vec::new();
        for i in 1..=4 {
            let before = sent.load(Ordering::SeqCst);
            let req = request(i, primed || i > 1);
            let resp = pool.send(addr, Proto::Http2, req).await.expect("response");
            assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
            if i > 1 {
                sizes.push(sent.load(Ordering::SeqCst) - before);
            }
        }
        sizes
    };
    let (primed, literal) = (heads(true).await, heads(false).await);
    assert!(primed[1] + 12 <= literal[1], "names not indexed: {primed:?} against {literal:?}");
}
