//! The source header of a mesh opaque stream (ALPN `plexus.tcp`): what
//! [`crate::http::headers::SOURCE`] is to HTTP, for TCP. Right after the mutual TLS handshake
//! the calling sidecar writes its workload and Service (`WORKLOAD/SERVICE`, possibly empty) as
//! a 2-byte big-endian length and the bytes; the destination sidecar reads it before anything
//! else, and labels the stream's metrics with it beside the principal mTLS proves. (Linkerd's
//! transport header does the same for opaque ports.) It is believed only because the stream is
//! mutually authenticated; the application never sees it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The longest header accepted: two DNS names and a `/`.
pub const MAX_LEN: usize = 2 * 253 + 1;

/// Writes the header (`source`: `WORKLOAD/SERVICE`, or `None` when this proxy has no labels)
/// and flushes it, so that a server-first peer is not kept waiting for it.
pub async fn write<W: AsyncWrite + Unpin>(io: &mut W, source: Option<&[u8]>) -> std::io::Result<()> {
    let source = source.filter(|s| s.len() <= MAX_LEN).unwrap_or_default();
    let len = u16::try_from(source.len()).unwrap_or_default();
    let mut header = Vec::with_capacity(2 + source.len());
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&source[..usize::from(len)]);
    io.write_all(&header).await?;
    io.flush().await
}

/// Reads the header within `timeout`: `Ok(Some((workload, service)))` when it names them (each
/// a DNS name), `Ok(None)` when it is empty or not well-formed names; an error when the stream
/// ends, stalls or announces more than [`MAX_LEN`] bytes.
pub async fn read<R: AsyncRead + Unpin>(io: &mut R, timeout: Duration) -> std::io::Result<Option<(String, String)>> {
    let read = async {
        let mut len = [0u8; 2];
        io.read_exact(&mut len).await?;
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_LEN {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "source header too long"));
        }
        let mut bytes = vec![0u8; len];
        io.read_exact(&mut bytes).await?;
        Ok(http::HeaderValue::from_bytes(&bytes)
            .ok()
            .and_then(|v| crate::http::headers::parse_source(&v).map(|(w, s)| (w.to_string(), s.to_string()))))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no source header"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_refuses_what_is_not_a_source() {
        let t = Duration::from_secs(1);
        for (sent, want) in [
            (Some(&b"client-7f3/client"[..]), Some(("client-7f3".to_string(), "client".to_string()))),
            (None, None),
            (Some(&b"Admin/x"[..]), None),
            (Some(&b"no-slash"[..]), None),
        ] {
            let (mut a, mut b) = tokio::io::duplex(1024);
            write(&mut a, sent).await.expect("write");
            a.write_all(b"payload").await.expect("write");
            assert_eq!(read(&mut b, t).await.expect("read"), want, "{sent:?}");
            let mut rest = [0u8; 7];
            b.read_exact(&mut rest).await.expect("payload");
            assert_eq!(&rest, b"payload", "the stream follows the header untouched");
        }
        // Too long, truncated or missing: an error (the stream is refused).
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&u16::MAX.to_be_bytes()).await.expect("write");
        assert!(read(&mut b, t).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 10, b'a']).await.expect("write");
        drop(a);
        assert!(read(&mut b, t).await.is_err());
        let (_a, mut b) = tokio::io::duplex(64);
        assert!(read(&mut b, Duration::from_millis(50)).await.is_err());
    }
}
