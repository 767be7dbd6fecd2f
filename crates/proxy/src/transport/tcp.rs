//! Opaque TCP forwarding: a bidirectional copy that propagates half-close and closes idle
//! streams.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
        let copy = copy_bidirectional(&mut client, &mut upstream);
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

/// The first buffer of each direction of a stream; doubled each time a read fills it.
const FIRST_BUFFER: usize = 1024;
/// The largest buffer (a TLS record's payload).
const MAX_BUFFER: usize = 16 * 1024;

/// Copies both ways until both directions have ended (each end propagated as a write shutdown
/// of the other side); the first error ends both. Tokio's copy gives each direction a buffer of
/// fixed size up front (two 16 KiB for every stream, idle or not, kept for its whole life);
/// here a direction's buffer starts at [`FIRST_BUFFER`] and grows to [`MAX_BUFFER`] only when
/// the traffic fills it, so a stream of small messages (a database session, a pooled idle
/// connection) holds 2 KiB.
async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_to_b, mut b_to_a) = (Half::default(), Half::default());
    std::future::poll_fn(|cx| {
        let a_done = a_to_b.poll_copy(cx, &mut *a, &mut *b)?.is_ready();
        let b_done = b_to_a.poll_copy(cx, &mut *b, &mut *a)?.is_ready();
        if a_done && b_done { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
}

/// One direction of a copy.
#[derive(Default)]
struct Half {
    /// Empty until the first read.
    buf: Vec<u8>,
    /// Bytes `pos..filled` of `buf` are read and not yet written.
    pos: usize,
    filled: usize,
    /// The reader ended (EOF).
    read_done: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    /// EOF propagated as a shutdown of the writer: nothing left to do.
    done: bool,
}

impl Half {
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.filled && !self.read_done {
                // Everything read was written: the buffer may be replaced by a larger one.
                if self.buf.is_empty() {
                    self.buf = vec![0; FIRST_BUFFER];
                } else if self.filled == self.buf.len() && self.buf.len() < MAX_BUFFER {
                    self.buf = vec![0; (self.buf.len() * 2).min(MAX_BUFFER)];
                }
                let mut read = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut read) {
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(result) => {
                        result?;
                        self.pos = 0;
                        self.filled = read.filled().len();
                        self.read_done = self.filled == 0;
                    }
                }
            }
            while self.pos < self.filled {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::WriteZero, "the writer took no bytes")));
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
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

    /// Bulk both ways at once (the buffers grow while bytes are in flight) and a half-close:
    /// every byte arrives in order, and the other direction goes on after one side's end.
    #[tokio::test]
    async fn bulk_both_ways_and_a_half_close_arrive_whole() {
        let (client, upstream, task) = proxied(Duration::from_secs(30)).await;
        let up: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..700_001u32).map(|i| (i % 241) as u8).collect();
        let (mut client_r, mut client_w) = client.into_split();
        let (mut upstream_r, mut upstream_w) = upstream.into_split();
        let (up2, down2) = (up.clone(), down.clone());
        let sending = tokio::spawn(async move {
            client_w.write_all(&up2).await.expect("client write");
            // Half-close: the upstream sees EOF, and still answers.
            client_w.shutdown().await.expect("client shutdown");
        });
        let answering = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream_r.read_to_end(&mut got).await.expect("upstream read");
            upstream_w.write_all(&down2).await.expect("upstream write");
            drop(upstream_w);
            got
        });
        let mut received = Vec::new();
        client_r.read_to_end(&mut received).await.expect("client read");
        sending.await.expect("sending");
        let got = answering.await.expect("answering");
        assert!(got == up, "client → upstream: {} bytes of {}", got.len(), up.len());
        assert!(received == down, "upstream → client: {} bytes of {}", received.len(), down.len());
        let (moved, end) = task.await.expect("task");
        assert!(end.is_ok(), "{end:?}");
        assert_eq!((moved.sent, moved.received), (up.len() as u64, down.len() as u64));
    }

    /// A direction's buffer starts small and grows only when reads fill it.
    #[tokio::test]
    async fn a_buffer_grows_only_with_the_traffic() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, mut upstream) = pair().await;
        let mut half = Half::default();
        client.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        relay_until_read(&mut half, &mut proxy_in, &mut proxy_out, &mut upstream, &mut got).await;
        assert_eq!(&got, b"ping");
        assert_eq!(half.buf.len(), FIRST_BUFFER, "a small message needs only the first buffer");
        let big = vec![7u8; 64 * 1024];
        client.write_all(&big).await.expect("write");
        let mut sink = vec![0u8; big.len()];
        relay_until_read(&mut half, &mut proxy_in, &mut proxy_out, &mut upstream, &mut sink).await;
        assert!(half.buf.len() > FIRST_BUFFER && half.buf.len() <= MAX_BUFFER, "{}", half.buf.len());
    }

    /// Copies through `half` (from `proxy_in` to `proxy_out`), one poll at a time, until
    /// `upstream` has read `want.len()` bytes into `want`.
    async fn relay_until_read(
        half: &mut Half,
        proxy_in: &mut TcpStream,
        proxy_out: &mut TcpStream,
        upstream: &mut TcpStream,
        want: &mut [u8],
    ) {
        let read = upstream.read_exact(want);
        tokio::pin!(read);
        loop {
            std::future::poll_fn(|cx| {
                let _ = half.poll_copy(cx, proxy_in, proxy_out);
                Poll::Ready(())
            })
            .await;
            if let Some(r) = futures_now(&mut read).await {
                r.expect("read");
                break;
            }
        }
    }

    /// Polls `f` once after yielding (so the peer's bytes can arrive): its output if ready.
    async fn futures_now<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::task::yield_now().await;
        std::future::poll_fn(|cx| {
            Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
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
