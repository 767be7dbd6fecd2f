//! What the two forwarders share: their command line and their accept loop.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// `LISTEN_PORT UPSTREAM_PORT` from the command line.
pub fn ports() -> Result<(u16, u16), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [listen, upstream] => Ok((listen.parse()?, upstream.parse()?)),
        _ => Err("usage: LISTEN_PORT UPSTREAM_PORT".into()),
    }
}

/// Reads `LISTEN_PORT UPSTREAM_PORT` from the command line and, on a current-thread runtime
/// (as a sidecar's), serves each connection accepted on 127.0.0.1:LISTEN_PORT with `serve`
/// in a task of its own.
pub fn run<F, Fut>(serve: F) -> Result<(), Error>
where
    F: Fn(TcpStream, u16) -> Fut + Copy + 'static,
    Fut: Future<Output = Result<(), Error>> + 'static,
{
    let (listen, upstream) = ports()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, listen))).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(client, upstream).await {
                    eprintln!("connection: {e}");
                }
            });
        }
    })
}

/// A connection to the upstream on 127.0.0.1:`port`, without Nagle's delay.
pub async fn connect(port: u16) -> Result<TcpStream, Error> {
    let server = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    server.set_nodelay(true)?;
    Ok(server)
}

/// The body's length from `Content-Length`; anything else is not handled here.
pub fn body_length(headers: &[httparse::Header<'_>]) -> Result<usize, Error> {
    let mut length = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") || h.name.eq_ignore_ascii_case("expect") {
            return Err(format!("{} is not handled by this floor", h.name).into());
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)?.trim().parse()?;
        }
    }
    Ok(length)
}
