//! Connection-level plumbing: listening, original destinations, protocol detection and
//! opaque TCP forwarding. Plain async functions over concrete types.

pub mod detect;
pub mod io;
pub mod listen;
pub mod sni;
pub mod source;
pub mod tcp;

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination the client originally dialled before an iptables REDIRECT, or `None` when
/// the connection was made to the listener itself (explicit mode) or no NAT entry exists.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let orig = if local.is_ipv4() { sock.original_dst_v4() } else { sock.original_dst_v6() };
    let orig = orig.ok()?.as_socket()?;
    (orig != local).then_some(orig)
}
