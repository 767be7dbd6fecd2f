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
/// write shutdown on the other), or until nothing moves for `idle_timeout`.
pub async fn forward<C, U>(client: C, upstream: U, idle_timeout: Duration) -> std::io::Result<Transferred>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::default();
    activity.touch();
    let mut client = Tracked::new(client, activity.clone());
    let mut upstream = Tracked::new(upstream, activity.clone());
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 16 * 1024, 16 * 1024);
    tokio::pin!(copy);
    loop {
        let check = idle_timeout.saturating_sub(activity.idle_for()).max(Duration::from_millis(10));
        tokio::select! {
            r = &mut copy => {
                let (sent, received) = r?;
                return Ok(Transferred { sent, received });
            }
            _ = tokio::time::sleep(check) => {
                if activity.idle_for() >= idle_timeout {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
        }
    }
}
