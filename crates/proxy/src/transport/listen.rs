//! Binding listeners and accepting connections under a connection limit.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Binds a TCP listener with `SO_REUSEADDR` and a large backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts the next connection, holding a permit of `limit` for its lifetime. Connections
/// over the limit are closed at once; accept errors (e.g. out of file descriptors) back off
/// briefly instead of spinning.
pub async fn accept(listener: &TcpListener, limit: &Arc<Semaphore>) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let _ = stream.set_nodelay(true);
                    return (stream, peer, permit);
                }
                Err(_) => {
                    tracing::warn!(%peer, "connection limit reached; closing connection");
                    drop(stream);
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
