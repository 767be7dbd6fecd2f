//! The server's dispatch and accounting: a connection of unknown protocol told by its first
//! bytes, and a reset HTTP/2 stream no longer counted in flight.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::http::body;

fn server(idle_timeout: Duration) -> HttpServer {
    let limits = Limits { idle_timeout, ..Limits::default() };
    HttpServer::new(&limits, Gauge::default())
}

/// Answers with the request's version; `/forever` never answers.
async fn answer(req: Request<ReceivedBody>) -> Response<Body> {
    if req.uri().path() == "/forever" {
        std::future::pending::<()>().await;
    }
    Response::new(body::full(format!("{:?}", req.version())))
}

/// Serves one connection of unknown protocol (as the mesh ALPN `plexus.h2` does) in a task;
/// returns the client's end.
fn serve_undetected(server: HttpServer) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
    let (client, io) = tokio::io::duplex(64 * 1024);
    let (_drain, watch) = watch::channel(false);
    let task = tokio::spawn(async move {
        let _drain = _drain;
        server.serve(io, watch, answer).await;
    });
    (client, task)
}

#[tokio::test]
async fn a_connection_of_unknown_protocol_is_told_by_its_first_bytes() {
    let (io, _task) = serve_undetected(server(Duration::from_secs(60)));
    let (client, conn) = h2::client::handshake(io).await.expect("client handshake");
    tokio::spawn(conn);
    let req = Request::get("http://test/").body(()).expect("request");
    let (resp, _) = client.ready().await.expect("ready").send_request(req, true).expect("send");
    let mut body = resp.await.expect("response").into_body();
    let data = body.data().await.expect("data").expect("ok");
    assert_eq!(data, "HTTP/2.0");

    let (mut io, _task) = serve_undetected(server(Duration::from_secs(60)));
    // Sent in two pieces: the first is a prefix of the preface.
    io.write_all(b"P").await.expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    io.write_all(b"OST / HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n").await.expect("write");
    let mut got = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut got)).await.expect("answered").expect("read");
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("HTTP/1.1"), "{text}");
}

#[tokio::test]
async fn an_http2_stream_reset_by_its_client_is_no_longer_in_flight() {
    // The idle timeout closes the connection only once no request is in flight: a reset stream's
    // handler, dropped, must not count any more.
    let (io, task) = serve_undetected(server(Duration::from_millis(300)));
    let (client, conn) = h2::client::handshake(io).await.expect("client handshake");
    let conn = tokio::spawn(conn);
    let req = Request::get("http://test/forever").body(()).expect("request");
    let (resp, mut tx) = client.ready().await.expect("ready").send_request(req, true).expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send_reset(h2::Reason::CANCEL);
    drop(resp);
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("closed when idle").expect("task");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await.expect("client saw the close");
}
