//! Opaque TCP forwarding: a bidirectional copy that propagates half-close and closes idle
//! streams.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::io::{Activity, Tracked};

/// Bytes moved by a finished stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// Client → upstream.
    pub sent: u64,
    /// Upstream → client.
    pub received: u64,
}

/// Copies both ways until both sides have closed (a half-close on one side is propagated as a
/// write shutdown on the other), or until nothing moves for `idle_timeout`. Returns the bytes
/// moved however the stream ended, with the error (an idle timeout is `TimedOut`) if it did
/// not end cleanly.
pub async fn forward<C, U>(client: C, upstream: U, idle_timeout: Duration) -> (Transferred, std::io::Result<()>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::default();
    activity.touch();
    let mut client = Tracked::new(client, activity.clone());
    let mut upstream = Tracked::new(upstream, activity.clone());
    let end = {
        let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 16 * 1024, 16 * 1024);
        tokio::pin!(copy);
        loop {
            let check = idle_timeout.saturating_sub(activity.idle_for()).max(Duration::from_millis(10));
            tokio::select! {
                r = &mut copy => break r.map(drop),
                _ = tokio::time::sleep(check) => {
                    if activity.idle_for() >= idle_timeout {
                        break Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout"));
                    }
                }
            }
        }
    };
    (Transferred { sent: upstream.written(), received: client.written() }, end)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair of real TCP streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    /// A proxied stream: `client` talks to `upstream` through `forward`.
    async fn proxied(
        idle: Duration,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<(Transferred, std::io::Result<()>)>) {
        let (client, proxy_in) = pair().await;
        let (proxy_out, upstream) = pair().await;
        let task = tokio::spawn(forward(proxy_in, proxy_out, idle));
        (client, upstream, task)
    }

    async fn exchange(client: &mut TcpStream, upstream: &mut TcpStream, up: usize, down: usize) {
        client.write_all(&vec![1u8; up]).await.expect("client write");
        upstream.read_exact(&mut vec![0u8; up]).await.expect("upstream read");
        upstream.write_all(&vec![2u8; down]).await.expect("upstream write");
        client.read_exact(&mut vec![0u8; down]).await.expect("client read");
    }

    #[tokio::test]
    async fn a_clean_close_counts_both_directions() {
        let (mut client, mut upstream, task) = proxied(Duration::from_secs(30)).await;
        exchange(&mut client, &mut upstream, 1000, 3000).await;
        drop(client);
        drop(upstream);
        let (moved, end) = task.await.expect("task");
        assert!(end.is_ok(), "{end:?}");
        assert_eq!((moved.sent, moved.received), (1000, 3000));
    }

    #[tokio::test]
    async fn an_idle_timeout_keeps_the_counts() {
        let (mut client, mut upstream, task) = proxied(Duration::from_millis(200)).await;
        exchange(&mut client, &mut upstream, 1234, 5678).await;
        let (moved, end) = task.await.expect("task");
        assert_eq!(end.map_err(|e| e.kind()), Err(std::io::ErrorKind::TimedOut));
        assert_eq!((moved.sent, moved.received), (1234, 5678));
    }

    #[tokio::test]
    async fn a_reset_keeps_the_counts() {
        let (mut client, mut upstream, task) = proxied(Duration::from_secs(30)).await;
        exchange(&mut client, &mut upstream, 700, 900).await;
        // A reset (RST) instead of a close: the proxy's next read from upstream fails.
        upstream.set_zero_linger().expect("linger");
        drop(upstream);
        let (moved, end) = task.await.expect("task");
        assert!(end.is_err(), "a reset is an error");
        assert_eq!((moved.sent, moved.received), (700, 900));
        drop(client);
    }
}
