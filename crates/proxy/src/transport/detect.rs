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
/// The largest TLS record a ClientHello may fill: also how many bytes classification ever
/// looks at (no decision needs more).
const MAX_TLS_RECORD: usize = 16 * 1024 + 5;

/// The longest method token read as HTTP/1 (`PROPPATCH` is 9): a longer one — or ten or more
/// upper-case bytes with no space yet — makes the stream opaque.
const MAX_METHOD: usize = 16;

/// Classifies the first bytes of a stream; `None` when more bytes are needed to decide.
///
/// The decision depends on the bytes only, never on how they arrived: once a prefix decides,
/// every longer input decides the same (`classify(&b[..n]) == Some(p)` implies
/// `classify(b) == Some(p)`), so the same bytes give the same class whether they came in one
/// read or one byte at a time. Only the first [`MAX_TLS_RECORD`] bytes are looked at, and at
/// that many bytes there is always a decision. (A stream that ends or times out undecided is
/// opaque: see [`sniff`].)
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let buf = &buf[..buf.len().min(MAX_TLS_RECORD)];
    let decided = classify_prefix(buf);
    if decided.is_none() && buf.len() == MAX_TLS_RECORD { Some(Protocol::Opaque) } else { decided }
}

fn classify_prefix(buf: &[u8]) -> Option<Protocol> {
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
        // The whole record, or as much of it as classification looks at: what the
        // ClientHello says is then read from the same bytes however they arrived.
        let end = (5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]))).min(MAX_TLS_RECORD);
        if buf.len() < end {
            return None;
        }
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
/// token of at most [`MAX_METHOD`] bytes followed by ` /`.
fn request_line(buf: &[u8]) -> Option<Protocol> {
    let token_end = buf.iter().take(MAX_METHOD + 1).position(|b| *b == b' ');
    match token_end {
        Some(i) => {
            let token = &buf[..i];
            let known = METHODS.contains(&token);
            let upper = !token.is_empty() && token.iter().all(|b| b.is_ascii_uppercase());
            match buf.get(i + 1) {
                _ if known => Some(Protocol::Http1),
                Some(b'/') if upper => Some(Protocol::Http1),
                None if upper => None,
                _ => Some(Protocol::Opaque),
            }
        }
        // No space yet: undecided while it can still be a method.
        None if buf.len() <= MAX_METHOD && buf.iter().all(|b| b.is_ascii_uppercase()) => None,
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
                Some(up) => spoke(up.as_ref()).await,
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

/// Returns once the server has sent something (bytes, or a close). Readiness alone is no
/// proof: tokio keeps a socket readable until a read sees `WouldBlock`, and the reads of a TLS
/// handshake on the same socket stop as soon as it is complete, so a mesh TLS connection is
/// often still "readable" with nothing to read. A peek that does not wait confirms it, and a
/// stale readiness is cleared when nothing is there.
async fn spoke(up: &TcpStream) -> std::io::Result<()> {
    loop {
        up.readable().await?;
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match up.try_io(tokio::io::Interest::READABLE, || socket2::SockRef::from(up).peek(&mut byte)) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
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

    /// An early connection left readable by earlier reads (a mesh TLS handshake's) is not a
    /// server speaking first: a client slower than `client_first_wait` is still classified by
    /// its own bytes (before: a slow HTTP client over mesh TLS was taken for server-first and
    /// forwarded opaque, unrouted).
    #[tokio::test]
    async fn stale_readiness_of_the_early_connection_is_not_a_greeting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let up_addr = upstream.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.expect("accept");
            // One byte, as the end of a handshake would be, then silence.
            tokio::io::AsyncWriteExt::write_all(&mut s, b"x").await.expect("write");
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            tokio::time::sleep(Duration::from_millis(60)).await;
            tokio::io::AsyncWriteExt::write_all(&mut c, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("write");
            c
        });
        let (mut accepted, _) = listener.accept().await.expect("accept");
        let open = || async move {
            let up = TcpStream::connect(up_addr).await?;
            // Read the byte without seeing `WouldBlock`: the socket stays marked readable.
            let mut byte = [0u8; 1];
            loop {
                up.readable().await?;
                match up.try_read(&mut byte) {
                    Ok(1) => break,
                    Ok(_) => return Err(std::io::Error::other("closed")),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(up)
        };
        let mut buf = BytesMut::new();
        let sniffed =
            sniff(&mut accepted, &mut buf, Duration::from_millis(10), Duration::from_secs(5), Some(open)).await;
        assert!(matches!(sniffed, Ok(Sniffed::Client(Protocol::Http1, Some(_)))), "{:?}", sniffed.map(|_| ()));
        drop(client.await);
        server.abort();
    }

    /// The class as [`sniff`] reaches it when the bytes arrive in `chunks`: the first decision
    /// as the buffer grows, else (the stream ended) opaque.
    fn arriving(chunks: &[&[u8]]) -> Protocol {
        let mut buf = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            if let Some(p) = classify(&buf) {
                return p;
            }
        }
        classify(&buf).unwrap_or(Protocol::Opaque)
    }

    /// Every way of cutting `data` into reads (one read; two reads at every point; one byte
    /// at a time) gives the class the whole input gives.
    fn same_in_every_split(data: &[u8]) -> Result<(), String> {
        let whole = arriving(&[data]);
        for cut in 0..=data.len() {
            let split = arriving(&[&data[..cut], &data[cut..]]);
            if split != whole {
                return Err(format!("cut at {cut}: {split:?}, whole: {whole:?}"));
            }
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        let one_by_one = arriving(&bytes);
        if one_by_one != whole {
            return Err(format!("byte by byte: {one_by_one:?}, whole: {whole:?}"));
        }
        Ok(())
    }

    /// Issue 16 (fuzz finding): 28 junk bytes then `GET /a` was opaque when a 10-byte prefix
    /// arrived first and HTTP/1 when it came whole. The same bytes now give the same class.
    #[test]
    fn the_class_does_not_depend_on_how_bytes_arrive() {
        let junk = [b"AAAAAAAAAAAAAAAAAAAAAAAAAAAA".as_slice(), b"GET /a HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(arriving(&[&junk]), Protocol::Opaque);
        assert_eq!(arriving(&[&junk[..10], &junk[10..]]), Protocol::Opaque);
        let crlf = [vec![b'\n'; MAX_TLS_RECORD + 10].as_slice(), b"GET / HTTP/1.1\r\n\r\n"].concat();
        let mut record = vec![0x16, 3, 1, 0xff, 0xff];
        record.extend(std::iter::repeat_n(0u8, MAX_TLS_RECORD + 100));
        let long_method = [b"ABCDEFGHIJKLMNOPQ".as_slice(), b" /x HTTP/1.1\r\n\r\n"].concat();
        for (name, data) in [
            ("junk then GET", junk.as_slice()),
            ("more empty lines than classification reads", crlf.as_slice()),
            ("a TLS record longer than classification reads", record.as_slice()),
            ("a 17-byte method", long_method.as_slice()),
            ("a 16-byte method", b"ABCDEFGHIJKLMNOP /x HTTP/1.1\r\n".as_slice()),
            ("GET", b"GET /a HTTP/1.1\r\n\r\n".as_slice()),
            ("empty lines then GET", b"\r\n\r\nGET /a HTTP/1.1\r\n\r\n".as_slice()),
            ("h2", H2_PREFACE),
            ("almost h2", b"PRI * HTTP/1.1\r\n".as_slice()),
            ("redis", b"*1\r\n$4\r\nPING\r\n".as_slice()),
        ] {
            same_in_every_split(data).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(arriving(&[&crlf]), Protocol::Opaque);
        assert_eq!(arriving(&[&long_method]), Protocol::Opaque);
        assert!(matches!(arriving(&[&record]), Protocol::Tls { .. }));
    }

    /// The same through [`sniff`] on a real socket: written whole, or a byte at a time.
    #[tokio::test]
    async fn sniffing_a_socket_gives_the_same_class_however_the_bytes_are_written() {
        let data = [b"AAAAAAAAAAAAAAAAAAAAAAAAAAAA".as_slice(), b"GET /a HTTP/1.1\r\n\r\n"].concat();
        for byte_at_a_time in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let sent = data.clone();
            let client = tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await.expect("connect");
                c.set_nodelay(true).expect("nodelay");
                if byte_at_a_time {
                    for b in &sent {
                        tokio::io::AsyncWriteExt::write_all(&mut c, std::slice::from_ref(b)).await.expect("write");
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                } else {
                    tokio::io::AsyncWriteExt::write_all(&mut c, &sent).await.expect("write");
                }
                c
            });
            let (mut server, _) = listener.accept().await.expect("accept");
            let mut buf = BytesMut::new();
            let none = None::<fn() -> std::future::Ready<std::io::Result<TcpStream>>>;
            let sniffed = sniff(&mut server, &mut buf, Duration::from_millis(10), Duration::from_secs(5), none).await;
            assert!(
                matches!(sniffed, Ok(Sniffed::Client(Protocol::Opaque, None))),
                "byte at a time: {byte_at_a_time}: {:?}",
                sniffed.map(|_| ())
            );
            drop(client.await);
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const PIECES: &[&[u8]] = &[
            b"\r\n",
            b"\n",
            b"GET",
            b"HEAD",
            b" ",
            b"/",
            b"A",
            b"BREW",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PRI",
            b"\x16\x03\x01\x00\x05",
            b"\x16",
            b"\x03",
            b"get",
            b"\x00",
            b"x",
            b"HTTP/1.1\r\n",
            b"ABCDEFGHIJ",
        ];

        proptest! {
            #[test]
            fn same_bytes_same_class_in_every_split(
                pieces in prop::collection::vec(prop::sample::select(PIECES), 0..12),
                tail in prop::collection::vec(any::<u8>(), 0..8),
            ) {
                let data = [pieces.concat(), tail].concat();
                prop_assert!(same_in_every_split(&data).is_ok(), "{:?}: {:?}", data, same_in_every_split(&data));
            }
        }
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
