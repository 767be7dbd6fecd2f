//! `httparse-floor LISTEN_PORT UPSTREAM_PORT`: the least an HTTP/1.1 forwarder can do on
//! the same runtime — each accepted connection gets its own upstream connection; a request
//! head is parsed by httparse in a buffer the connection keeps and written upstream as
//! received, with its `Content-Length` body; the response likewise. No `HeaderMap`, no
//! per-request allocation, no chunked bodies, upgrades or `Expect` (refused): a measuring
//! stick, not a proxy.

use http1_floor::Error;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Largest head accepted, as the proxy's default.
const MAX_HEAD: usize = 64 * 1024;

fn main() -> Result<(), Error> {
    http1_floor::run(serve)
}

async fn serve(mut client: TcpStream, upstream: u16) -> Result<(), Error> {
    client.set_nodelay(true)?;
    let mut server = http1_floor::connect(upstream).await?;
    let (mut requests, mut responses) = (Vec::with_capacity(4096), Vec::with_capacity(4096));
    loop {
        let Some((head, body)) = read_head(&mut client, &mut requests, Head::Request).await? else {
            return Ok(());
        };
        forward(&mut client, &mut server, &mut requests, head + body).await?;
        let Some((head, body)) = read_head(&mut server, &mut responses, Head::Response).await? else {
            return Err("the upstream closed its connection".into());
        };
        forward(&mut server, &mut client, &mut responses, head + body).await?;
    }
}

#[derive(Clone, Copy)]
enum Head {
    Request,
    Response,
}

/// Reads until `buf` holds a whole head; returns its length and its body's (`None`: the peer
/// closed between messages).
async fn read_head(from: &mut TcpStream, buf: &mut Vec<u8>, kind: Head) -> Result<Option<(usize, usize)>, Error> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let complete = match kind {
            Head::Request => {
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(buf)? {
                    httparse::Status::Complete(n) => Some((n, http1_floor::body_length(request.headers)?)),
                    httparse::Status::Partial => None,
                }
            }
            Head::Response => {
                let mut response = httparse::Response::new(&mut headers);
                match response.parse(buf)? {
                    httparse::Status::Complete(n) if matches!(response.code, Some(100..=199 | 204 | 304)) => {
                        Some((n, 0))
                    }
                    httparse::Status::Complete(n) => Some((n, http1_floor::body_length(response.headers)?)),
                    httparse::Status::Partial => None,
                }
            }
        };
        if complete.is_some() {
            return Ok(complete);
        }
        if buf.len() >= MAX_HEAD {
            return Err("head too large".into());
        }
        buf.reserve(4096);
        if from.read_buf(buf).await? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err("closed within a head".into()) };
        }
    }
}

/// Writes the first `n` bytes of the message to `to`: what `buf` holds, then the rest of the
/// body as it is read from `from`. What `buf` holds past the message stays for the next one.
async fn forward(from: &mut TcpStream, to: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Result<(), Error> {
    let held = n.min(buf.len());
    to.write_all(&buf[..held]).await?;
    buf.drain(..held);
    let mut rest = n - held;
    while rest > 0 {
        buf.reserve(4096);
        let read = from.read_buf(buf).await?;
        if read == 0 {
            return Err("closed within a body".into());
        }
        let part = rest.min(buf.len());
        to.write_all(&buf[..part]).await?;
        buf.drain(..part);
        rest -= part;
    }
    Ok(())
}
