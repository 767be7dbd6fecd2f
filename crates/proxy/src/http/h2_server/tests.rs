//! The HTTP/2 server against real HTTP/2 clients: h2's (where a test needs to control the
//! frames: resets, streams in parallel) and hyper's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::*;
use crate::http::body;

type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

fn settings() -> Settings {
    Settings { max_header_list_size: 16 * 1024, keep_alive: SERVER_KEEP_ALIVE }
}

/// A server's connection being served in a task: the client's end of it, the sender that
/// calls `graceful_shutdown`, and the task's result.
struct Served {
    client: Option<DuplexStream>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), BoxError>>,
}

fn serve<S>(service: S, settings: Settings) -> Served
where
    S: Fn(Request<ReceivedBody>) -> Answer + Send + Unpin + 'static,
{
    let (client, server) = tokio::io::duplex(256 * 1024);
    let (shutdown, mut on_shutdown) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut conn = Connection::new(server, service, &settings);
        let mut shutting_down = false;
        std::future::poll_fn(|cx| {
            if !shutting_down && Pin::new(&mut on_shutdown).poll(cx).is_ready() {
                shutting_down = true;
                conn.graceful_shutdown();
            }
            Pin::new(&mut conn).poll(cx)
        })
        .await
    });
    Served { client: Some(client), shutdown: Some(shutdown), task }
}

/// h2's client on `io`, its connection driven in a task.
async fn h2_client(io: DuplexStream) -> h2::client::SendRequest<Bytes> {
    let (send, conn) = h2::client::handshake(io).await.expect("client handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends a request with no body and returns the response, its body read whole.
async fn get(client: &mut h2::client::SendRequest<Bytes>, path: &str) -> (Response<()>, Bytes) {
    let req = Request::get(format!("http://test{path}")).body(()).expect("request");
    let (resp, _) = client.clone().ready().await.expect("ready").send_request(req, true).expect("send");
    let resp = resp.await.expect("response");
    let (head, mut body) = resp.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    (Response::from_parts(head, ()), Bytes::from(bytes))
}

fn text(s: &'static str) -> Response<Body> {
    Response::new(body::full(s))
}

/// Sets its flag when dropped.
struct DropGuard(Arc<AtomicBool>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits (up to 5 s) for `cond`.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_get_ending_with_its_head_is_answered_with_an_empty_body() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = seen.clone();
    let mut served = serve(
        move |req: Request<ReceivedBody>| {
            let body = req.body();
            *record.lock().expect("lock") =
                Some((req.version(), req.uri().to_string(), body.is_end_stream(), body.size_hint().exact()));
            Box::pin(async { Response::new(body::empty()) }) as Answer
        },
        settings(),
    );
    let mut client = h2_client(served.client.take().expect("client")).await;
    let (resp, body) = get(&mut client, "/empty?x=1").await;
    assert_eq!(resp.status(), 200);
    assert!(body.is_empty());
    assert!(resp.headers().contains_key(header::DATE), "{resp:?}");
    assert!(!resp.headers().contains_key(header::CONTENT_LENGTH), "{resp:?}");
    let seen = seen.lock().expect("lock").clone().expect("handler called");
    assert_eq!(seen, (http::Version::HTTP_2, "http://test/empty?x=1".to_string(), true, Some(0)));
}

#[tokio::test]
async fn a_declared_content_length_is_the_bodys_exact_size() {
    let (hints_tx, mut hints) = mpsc::unbounded_channel();
    let mut served = serve(
        move |req: Request<ReceivedBody>| {
            let hints_tx = hints_tx.clone();
            Box::pin(async move {
                let mut body = req.into_body();
                let _ = hints_tx.send((body.is_end_stream(), body.size_hint().exact()));
                let _ = body.frame().await;
                let _ = hints_tx.send((body.is_end_stream(), body.size_hint().exact()));
                let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                Response::new(body::full(bytes))
            }) as Answer
        },
        settings(),
    );
    let client = h2_client(served.client.take().expect("client")).await;
    let req = Request::post("http://test/upload").header("content-length", "10").body(()).expect("request");
    let (resp, mut tx) = client.clone().ready().await.expect("ready").send_request(req, false).expect("send");
    assert_eq!(hints.recv().await, Some((false, Some(10))), "size before the body");
    tx.send_data(Bytes::from_static(b"hello"), false).expect("data");
    assert_eq!(hints.recv().await, Some((false, Some(5))), "size after 5 bytes");
    tx.send_data(Bytes::from_static(b"world"), true).expect("data");
    let resp = resp.await.expect("response");
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "5");
    // Without a declared length, no size is told.
    let (hints_tx, mut hints) = mpsc::unbounded_channel();
    let mut served = serve(
        move |req: Request<ReceivedBody>| {
            let _ = hints_tx.send((req.body().is_end_stream(), req.body().size_hint().exact()));
            Box::pin(async { Response::new(body::empty()) }) as Answer
        },
        settings(),
    );
    let client = h2_client(served.client.take().expect("client")).await;
    let req = Request::post("http://test/upload").body(()).expect("request");
    let (_resp, _tx) = client.clone().ready().await.expect("ready").send_request(req, false).expect("send");
    assert_eq!(hints.recv().await, Some((false, None)));
}

/// The handler streams the request body (and its trailers) back as the response body.
fn echo(req: Request<ReceivedBody>) -> Answer {
    Box::pin(async move {
        let len = req.headers().get(header::CONTENT_LENGTH).cloned();
        let mut resp = Response::new(body::boxed(req.into_body()));
        if let Some(len) = len {
            resp.headers_mut().insert("x-request-length", len);
        }
        resp
    })
}

#[tokio::test]
async fn a_body_larger_than_both_windows_is_echoed_with_its_trailers() {
    let mut served = serve(echo, settings());
    let io = TokioIo::new(served.client.take().expect("client"));
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("handshake");
    tokio::spawn(conn);
    const LEN: usize = 10 * 1024 * 1024;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        for _ in 0..LEN / chunk.len() {
            if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                return;
            }
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("sevens"));
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let body = body::boxed(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let req = Request::post("http://test/echo").body(body).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req)).await.expect("in time");
    let resp = resp.expect("response");
    assert_eq!(resp.status(), 200);
    let collected = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("in time")
        .expect("body");
    let trailers = collected.trailers().cloned().expect("trailers echoed");
    assert_eq!(trailers["x-checksum"], "sevens");
    let bytes = collected.to_bytes();
    assert_eq!(bytes.len(), LEN);
    assert!(bytes.iter().all(|b| *b == 7));
    // And the same from h2's client, with a declared length: it reaches the handler as the
    // body's size, and the echo carries it.
    let mut served = serve(echo, settings());
    let client = h2_client(served.client.take().expect("client")).await;
    let req = Request::post("http://test/echo").header("content-length", LEN.to_string()).body(()).expect("request");
    let (resp, mut tx) = client.clone().ready().await.expect("ready").send_request(req, false).expect("send");
    let sender = tokio::spawn(async move {
        let mut left = LEN;
        while left > 0 {
            tx.reserve_capacity(left.min(256 * 1024));
            let granted = std::future::poll_fn(|cx| tx.poll_capacity(cx)).await.expect("capacity").expect("open");
            let n = granted.min(left);
            left -= n;
            tx.send_data(Bytes::from(vec![9u8; n]), false).expect("data");
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("nines"));
        tx.send_trailers(trailers).expect("trailers");
    });
    let resp = resp.await.expect("response");
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], LEN.to_string().as_str());
    let mut body = resp.into_body();
    let mut received = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        assert!(chunk.iter().all(|b| *b == 9));
        received += chunk.len();
    }
    assert_eq!(received, LEN);
    let trailers = body.trailers().await.expect("trailers").expect("some");
    assert_eq!(trailers["x-checksum"], "nines");
    sender.await.expect("sender");
}

#[tokio::test]
async fn concurrent_streams_are_answered_as_they_are_ready() {
    let release = Arc::new(Notify::new());
    let waiting = release.clone();
    let mut served = serve(
        move |req: Request<ReceivedBody>| {
            let waiting = waiting.clone();
            Box::pin(async move {
                if req.uri().path() == "/slow" {
                    waiting.notified().await;
                    return text("slow");
                }
                // The others answer in reverse order of their number.
                let n: u64 = req.uri().path().trim_start_matches('/').parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(100 - n)).await;
                Response::new(body::full(n.to_string()))
            }) as Answer
        },
        settings(),
    );
    let client = h2_client(served.client.take().expect("client")).await;
    let mut slow_client = client.clone();
    let slow = tokio::spawn(async move { get(&mut slow_client, "/slow").await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    for n in 0..50u64 {
        let mut client = client.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let (resp, body) = get(&mut client, &format!("/{n}")).await;
            assert_eq!(resp.status(), 200);
            let _ = done_tx.send(body);
        });
    }
    let mut order = Vec::new();
    for _ in 0..50 {
        let body = tokio::time::timeout(Duration::from_secs(5), done.recv()).await.expect("answered").expect("body");
        order.push(String::from_utf8(body.to_vec()).expect("text").parse::<u64>().expect("number"));
    }
    assert!(!slow.is_finished(), "the slow stream answered before it was released");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    assert_ne!(order, sorted, "answered in the order asked, not as ready");
    release.notify_one();
    let (_, body) = tokio::time::timeout(Duration::from_secs(5), slow).await.expect("in time").expect("task");
    assert_eq!(body, "slow");
}

#[tokio::test]
async fn a_stream_the_client_resets_drops_its_handler_and_others_go_on() {
    let dropped = Arc::new(AtomicBool::new(false));
    let guard_flag = dropped.clone();
    let mut served = serve(
        move |req: Request<ReceivedBody>| {
            if req.uri().path() == "/forever" {
                let guard = DropGuard(guard_flag.clone());
                return Box::pin(async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                    text("never")
                }) as Answer;
            }
            Box::pin(async { text("ok") }) as Answer
        },
        settings(),
    );
    let mut client = h2_client(served.client.take().expect("client")).await;
    let req = Request::get("http://test/forever").body(()).expect("request");
    let (resp, mut tx) = client.clone().ready().await.expect("ready").send_request(req, true).expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!dropped.load(Ordering::SeqCst), "handler dropped before the reset");
    tx.send_reset(h2::Reason::CANCEL);
    drop(resp);
    until("the handler to be dropped", || dropped.load(Ordering::SeqCst)).await;
    let (resp, body) = get(&mut client, "/other").await;
    assert_eq!((resp.status().as_u16(), body), (200, Bytes::from_static(b"ok")));
    assert!(!served.task.is_finished());
}

/// A body that gives one chunk, then fails.
struct Failing(VecDeque<Bytes>);

impl http_body::Body for Failing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(Some(match self.0.pop_front() {
            Some(b) => Ok(Frame::data(b)),
            None => Err("the upstream went away".into()),
        }))
    }
}

#[tokio::test]
async fn a_response_body_error_resets_that_stream_only() {
    let mut served = serve(
        |req: Request<ReceivedBody>| {
            if req.uri().path() == "/broken" {
                let body = Failing(VecDeque::from([Bytes::from_static(b"partial")]));
                return Box::pin(async move { Response::new(body::boxed(body)) }) as Answer;
            }
            Box::pin(async { text("fine") }) as Answer
        },
        settings(),
    );
    let client = h2_client(served.client.take().expect("client")).await;
    let req = Request::get("http://test/broken").body(()).expect("request");
    let (resp, _) = client.clone().ready().await.expect("ready").send_request(req, true).expect("send");
    // The head, the chunk and the reset may reach the client together: it may see only the reset.
    let reason = match resp.await {
        Err(e) => e.reason(),
        Ok(resp) => {
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let mut reason = None;
            while let Some(chunk) = body.data().await {
                match chunk {
                    Ok(c) => assert_eq!(c, "partial"),
                    Err(e) => {
                        reason = e.reason();
                        break;
                    }
                }
            }
            reason
        }
    };
    assert_eq!(reason, Some(h2::Reason::INTERNAL_ERROR));
    let mut client = client;
    let (resp, body) = get(&mut client, "/next").await;
    assert_eq!((resp.status().as_u16(), body), (200, Bytes::from_static(b"fine")));
}

#[tokio::test]
async fn graceful_shutdown_sends_goaway_finishes_the_stream_in_flight_then_ends() {
    let release = Arc::new(Notify::new());
    let waiting = release.clone();
    let mut served = serve(
        move |_req: Request<ReceivedBody>| {
            let waiting = waiting.clone();
            Box::pin(async move {
                waiting.notified().await;
                text("finished")
            }) as Answer
        },
        settings(),
    );
    let io = served.client.take().expect("client");
    let (send, conn) = h2::client::handshake(io).await.expect("client handshake");
    let client_conn = tokio::spawn(conn);
    let mut in_flight = send.clone();
    let request = tokio::spawn(async move { get(&mut in_flight, "/slow").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    served.shutdown.take().expect("shutdown").send(()).expect("server running");
    // The GOAWAY reaches the client: it takes no new stream.
    let mut refused = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let req = Request::get("http://test/late").body(()).expect("request");
        if send.clone().ready().await.and_then(|mut s| s.send_request(req, true).map(|_| ())).is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "a stream was still taken after the GOAWAY");
    assert!(!served.task.is_finished(), "the connection ended with a stream in flight");
    release.notify_one();
    let (resp, body) = tokio::time::timeout(Duration::from_secs(5), request).await.expect("in time").expect("task");
    assert_eq!((resp.status().as_u16(), body), (200, Bytes::from_static(b"finished")));
    let ended = tokio::time::timeout(Duration::from_secs(5), served.task).await.expect("ended").expect("task");
    assert!(ended.is_ok(), "{ended:?}");
    let _ = tokio::time::timeout(Duration::from_secs(5), client_conn).await.expect("client connection ended");
}

/// A frame header: length, type, flags, stream 0.
fn frame_header(len: u32, kind: u8, flags: u8) -> [u8; 9] {
    let l = len.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, 0, 0, 0, 0]
}

#[tokio::test]
async fn a_connection_without_pong_is_closed_and_one_with_pongs_is_not() {
    let keep_alive = KeepAlive { interval: Duration::from_millis(50), timeout: Duration::from_millis(100) };
    let quick = Settings { keep_alive, ..settings() };
    // A raw peer: the preface and an empty SETTINGS, then it reads nothing (no PONG).
    let mut served = serve(|_req: Request<ReceivedBody>| Box::pin(async { text("ok") }) as Answer, quick);
    let mut peer = served.client.take().expect("client");
    peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
    peer.write_all(&frame_header(0, 0x4, 0)).await.expect("settings");
    let ended = tokio::time::timeout(Duration::from_secs(2), &mut served.task).await.expect("closed").expect("task");
    let e = ended.expect_err("ended with an error");
    assert!(e.to_string().contains("keep-alive"), "{e}");
    // What it sent: the server's SETTINGS, its PING, then GOAWAY.
    let mut sent = Vec::new();
    let _ = peer.read_to_end(&mut sent).await;
    let kinds = frame_kinds(&sent);
    assert!(kinds.contains(&0x6) && kinds.last() == Some(&0x7), "{kinds:?}");
    // h2's client answers the PINGs: the connection outlives many intervals.
    let mut served = serve(|_req: Request<ReceivedBody>| Box::pin(async { text("ok") }) as Answer, quick);
    let mut client = h2_client(served.client.take().expect("client")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!served.task.is_finished(), "closed although PONGs came back");
    let (resp, _) = get(&mut client, "/").await;
    assert_eq!(resp.status(), 200);
}

/// The types of the frames in `bytes` (whole frames only).
fn frame_kinds(mut bytes: &[u8]) -> Vec<u8> {
    let mut kinds = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        kinds.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    kinds
}

#[test]
fn connection_specific_fields_leave_a_response_head() {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
    headers.insert("x-hop", HeaderValue::from_static("1"));
    headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert("x-kept", HeaderValue::from_static("1"));
    strip_connection_specific(&mut headers);
    assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
}

#[test]
fn content_length_needs_all_its_values_to_agree() {
    let mut headers = HeaderMap::new();
    headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
    assert_eq!(content_length(&headers), Some(5));
    headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
    assert_eq!(content_length(&headers), Some(5));
    headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
    assert_eq!(content_length(&headers), None);
}

/// A `CONNECT` handler as the outbound one: the client's end taken, `200` with the hand-over,
/// and the tunnel echoing what it reads until the client ends its side. Anything else: 404.
fn tunnel_echo(req: Request<ReceivedBody>) -> Answer {
    Box::pin(async move {
        if req.method() != http::Method::CONNECT {
            return Response::builder().status(404).body(body::empty()).expect("response");
        }
        let (accepted, hand_over) = match crate::http::tunnel::accept(req) {
            Ok(a) => a,
            Err(e) => panic!("not accepted: {e}"),
        };
        tokio::spawn(async move {
            let end = accepted.established().await.expect("established");
            let (mut r, mut w) = tokio::io::split(end);
            tokio::io::copy(&mut r, &mut w).await.expect("echo");
            w.shutdown().await.expect("end of stream");
        });
        crate::http::tunnel::opening(Response::new(body::empty()), hand_over)
    })
}

#[tokio::test]
async fn a_connect_stream_is_a_tunnel_both_ways_beyond_both_windows() {
    let mut served = serve(tunnel_echo, settings());
    let mut client = h2_client(served.client.take().expect("client")).await;
    let req = Request::connect("tcpecho.test:9000").body(()).expect("request");
    let (resp, mut send) = client.clone().ready().await.expect("ready").send_request(req, false).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert!(!resp.headers().contains_key(header::CONTENT_LENGTH), "{resp:?}");
    let mut recv = resp.into_body();
    assert!(!recv.is_end_stream(), "the tunnel's stream ended with its head");

    // 1 MiB: past the client's 64 KiB window for what comes back, and the server's 1 MiB one.
    let sent: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let writer = {
        let sent = Bytes::from(sent.clone());
        tokio::spawn(async move {
            let mut at = 0;
            while at < sent.len() {
                send.reserve_capacity(sent.len() - at);
                let n = std::future::poll_fn(|cx| send.poll_capacity(cx)).await.expect("capacity").expect("open");
                send.send_data(sent.slice(at..at + n), false).expect("data");
                at += n;
            }
            send.send_data(Bytes::new(), true).expect("end of stream");
        })
    };
    let mut echoed = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("data");
        let _ = recv.flow_control().release_capacity(chunk.len());
        echoed.extend_from_slice(&chunk);
    }
    writer.await.expect("writer");
    assert_eq!(echoed.len(), sent.len(), "bytes echoed through the tunnel");
    assert!(echoed == sent, "the tunnel changed the bytes");

    // The connection goes on serving: another stream is answered.
    let (resp, _) = get(&mut client, "/after").await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_connect_refused_ends_its_stream_with_the_answer() {
    let mut served = serve(
        |_req: Request<ReceivedBody>| {
            Box::pin(async { Response::builder().status(403).body(body::full("no")).expect("response") }) as Answer
        },
        settings(),
    );
    let client = h2_client(served.client.take().expect("client")).await;
    let req = Request::connect("secret.test:22").body(()).expect("request");
    let (resp, _send) = client.clone().ready().await.expect("ready").send_request(req, false).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 403);
    let mut recv = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = recv.data().await {
        bytes.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(bytes, b"no");
}
