//! Protocol detection on a new connection: HTTP/1.1, HTTP/2 prior knowledge, TLS (with SNI)
//! or opaque TCP — and server-first protocols, where the client waits for the server.
//!
//! Server-first without configuration: if the client sends nothing within
//! `client_first_wait` (10 ms by default) and the destination is already known, the proxy
//! connects to it while still listening to the client. Whichever speaks first decides: bytes
//! from the server mean an opaque, server-first stream (the greeting is relayed at once);
//! bytes from the client are classified as usual (and the early connection is reused if the
//! stream turns out opaque). No protocol pays a multi-second detection timeout.

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::sni;

/// What a connection speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS ClientHello: its server name and ALPN protocols.
    Tls {
        sni: Option<String>,
        alpn: Vec<Vec<u8>>,
    },
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 18] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"REPORT",
    b"SEARCH",
];
/// The largest TLS record a ClientHello may fill.
const MAX_TLS_RECORD: usize = 16 * 1024 + 5;

/// Classifies the first bytes of a stream; `None` when more bytes are needed to decide.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    if buf[0] == 0x16 {
        if buf.len() < 5 {
            return None;
        }
        if buf[1] != 3 {
            return Some(Protocol::Opaque);
        }
        let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len && 5 + len <= MAX_TLS_RECORD {
            return None;
        }
        let end = (5 + len).min(buf.len());
        let hello = sni::client_hello(&buf[5..end]).unwrap_or_default();
        return Some(Protocol::Tls { sni: hello.sni, alpn: hello.alpn });
    }
    // Empty lines before the request line are skipped, as HTTP/1 servers do (RFC 9112 §2.2;
    // hyper does): they cannot make an HTTP request look opaque. Anything else before it
    // (spaces, other bytes) makes the stream opaque, and an opaque stream is refused on a port
    // with HTTP-level authorization rules.
    match buf.iter().position(|b| !matches!(b, b'\r' | b'\n')) {
        None => None,
        Some(start) => request_line(&buf[start..]),
    }
}

/// Whether `buf` starts with an HTTP/1 request line's method: a known method, or an upper-case
/// token followed by ` /`.
fn request_line(buf: &[u8]) -> Option<Protocol> {
    match buf.iter().position(|b| *b == b' ') {
        Some(i) => {
            let token = &buf[..i];
            let known = METHODS.contains(&token);
            let method_like =
                !token.is_empty() && token.iter().all(|b| b.is_ascii_uppercase()) && buf.get(i + 1) == Some(&b'/');
            if known || method_like {
                Some(Protocol::Http1)
            } else if token.iter().all(|b| b.is_ascii_uppercase()) && buf.len() == i + 1 {
                None
            } else {
                Some(Protocol::Opaque)
            }
        }
        None if buf.len() < 10 && buf.iter().all(|b| b.is_ascii_uppercase()) => None,
        None => Some(Protocol::Opaque),
    }
}

/// The outcome of sniffing a connection.
pub enum Sniffed<U> {
    /// The client spoke first; its bytes so far are in the buffer. `early` is the connection
    /// opened while waiting, if any (reusable for opaque streams).
    Client(Protocol, Option<U>),
    /// The server spoke first on `upstream`: forward opaquely.
    ServerFirst(U),
    /// The client closed without sending anything.
    Closed,
    /// Nothing classifiable arrived in time.
    TimedOut,
}

/// Reads the client's first bytes into `buf` and decides what the connection speaks.
/// `connect` opens the connection's destination, when known, for server-first protocols.
pub async fn sniff<F, Fut, U>(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    client_first_wait: Duration,
    deadline: Duration,
    connect: Option<F>,
) -> std::io::Result<Sniffed<U>>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::io::Result<U>>,
    U: AsRef<TcpStream>,
{
    let deadline = Instant::now() + deadline;
    let first_wait = Instant::now() + client_first_wait;
    let mut connect = connect;
    let mut early: Option<U> = None;
    loop {
        if let Some(p) = classify(buf) {
            return Ok(Sniffed::Client(p, early));
        }
        if buf.len() >= MAX_TLS_RECORD {
            return Ok(Sniffed::Client(Protocol::Opaque, early));
        }
        if buf.is_empty()
            && early.is_none()
            && Instant::now() >= first_wait
            && let Some(open) = connect.take()
        {
            match tokio::time::timeout_at(deadline, open()).await {
                Ok(Ok(upstream)) => early = Some(upstream),
                // Only a guess for server-first protocols: a client that is merely slow to send
                // (HTTP to a Service with no endpoint yet) must still be served and answered.
                Ok(Err(e)) => tracing::debug!(error = %e, "early upstream connection failed; waiting for the client"),
                Err(_) => return Ok(Sniffed::TimedOut),
            }
        }
        let wake = if buf.is_empty() && early.is_none() && connect.is_some() { first_wait } else { deadline };
        let server_spoke = async {
            match &early {
                Some(up) => up.as_ref().readable().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = client.read_buf(buf) => {
                if read? == 0 {
                    return Ok(if buf.is_empty() {
                        Sniffed::Closed
                    } else {
                        Sniffed::Client(classify(buf).unwrap_or(Protocol::Opaque), early)
                    });
                }
            }
            ready = server_spoke, if buf.is_empty() => {
                ready?;
                if let Some(up) = early.take() {
                    return Ok(Sniffed::ServerFirst(up));
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= deadline {
                    return Ok(if buf.is_empty() { Sniffed::TimedOut } else { Sniffed::Client(Protocol::Opaque, early) });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client slower than `client_first_wait` to a destination that cannot be reached is
    /// still detected (and so answered), not dropped because the early connection failed.
    #[tokio::test]
    async fn a_failed_early_connection_still_waits_for_the_client() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            tokio::time::sleep(Duration::from_millis(60)).await;
            tokio::io::AsyncWriteExt::write_all(&mut c, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("write");
            c
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        let mut buf = BytesMut::new();
        let refused = || async { Err::<TcpStream, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) };
        let sniffed =
            sniff(&mut server, &mut buf, Duration::from_millis(10), Duration::from_secs(5), Some(refused)).await;
        assert!(matches!(sniffed, Ok(Sniffed::Client(Protocol::Http1, None))), "{:?}", sniffed.map(|_| ()));
        drop(client.await);
    }

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"GET /%%%% garbage"),
            Some(Protocol::Http1),
            "malformed HTTP still goes to the HTTP server (400)"
        );
        assert_eq!(classify(b"BREW /pot HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"\x00\x01binary"), Some(Protocol::Opaque));
        assert_eq!(classify(b"HELLO world"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        // Empty lines before the request line do not hide it; other leading bytes make the
        // stream opaque (refused on a port with HTTP-level rules).
        assert_eq!(classify(b"\r\n\r\nGET /admin HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\n\nDELETE /x HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\n\r\n"), None);
        assert_eq!(classify(b"\r\nGE"), None);
        assert_eq!(classify(b" GET /admin HTTP/1.1\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get /admin HTTP/1.1\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\r\n\x16\x03\x01"), Some(Protocol::Opaque));
        let hello = super::sni::tests::client_hello("db.prod");
        let mut record = vec![0x16, 3, 1];
        record.extend((hello.len() as u16).to_be_bytes());
        assert_eq!(classify(&record), None, "waits for the whole ClientHello");
        record.extend(hello);
        assert_eq!(classify(&record), Some(Protocol::Tls { sni: Some("db.prod".into()), alpn: Vec::new() }));
    }
}
