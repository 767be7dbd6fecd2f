//! Sidecar DNS (SPEC §11): apps resolve mesh Service names without cluster DNS.
//!
//! In a pod, `plexus init` redirects the pod's port-53 traffic (UDP and TCP, except the
//! proxy's own UID) to this server (default `127.0.0.1:7753`). A query for a mesh Service
//! (`NAME`, `NAME.NS`, `NAME.NS.svc`, `NAME.NS.svc.cluster.local`, or one of those followed by
//! one of the pod's search domains) is answered here with the Service's virtual address: A
//! records only — AAAA and other types for a mesh name get an empty NOERROR, so clients fall
//! back to the IPv4 address at once. Everything else is forwarded, as received, to the
//! upstream resolvers of `/etc/resolv.conf` (this server's own address skipped), over the
//! transport the query came on.
//!
//! Bounded: at most `max_in_flight` queries are being answered at once (more are answered
//! SERVFAIL at once over UDP), at most `max_tcp_connections` TCP clients are served at once,
//! and every upstream exchange has a timeout. Packets that do not parse as a DNS message are
//! answered FORMERR when they carry a header, else dropped.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use plexus_core::ServiceName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::discovery::Discovery;

/// Where `plexus init` sends a pod's DNS traffic.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7753);
/// TTL of the answers for mesh names: short, so a changed virtual address is seen soon.
const MESH_TTL: u32 = 5;
/// Largest UDP message read or relayed (EDNS payloads above this are rare; the client
/// retries over TCP on truncation).
const UDP_MAX: usize = 4096;

/// How the DNS server runs.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Where it listens, UDP and TCP.
    pub listen: SocketAddr,
    /// Resolvers for names that are not mesh Services, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// The pod's search domains (lowercase, without the trailing dot).
    pub search: Vec<String>,
    /// Time allowed to each upstream for an answer.
    pub timeout: Duration,
    /// Queries answered at once.
    pub max_in_flight: usize,
    /// TCP clients served at once.
    pub max_tcp_connections: usize,
    /// Idle time after which a TCP client is closed.
    pub tcp_idle_timeout: Duration,
    /// `SO_MARK` on the upstream sockets (netns mode lets marked packets through).
    pub mark: Option<u32>,
}

impl DnsSettings {
    /// Settings with the upstreams and search domains of a `resolv.conf` text, skipping
    /// nameservers that are this server itself.
    pub fn from_resolv_conf(listen: SocketAddr, resolv_conf: &str) -> DnsSettings {
        let (upstreams, search) = parse_resolv_conf(resolv_conf, listen);
        DnsSettings {
            listen,
            upstreams,
            search,
            timeout: Duration::from_secs(2),
            max_in_flight: 256,
            max_tcp_connections: 64,
            tcp_idle_timeout: Duration::from_secs(10),
            mark: None,
        }
    }
}

/// The nameservers (port 53) and search domains of a `resolv.conf`; a nameserver that is
/// `listen` itself is left out (forwarding to it would loop).
pub fn parse_resolv_conf(text: &str, listen: SocketAddr) -> (Vec<SocketAddr>, Vec<String>) {
    let mut upstreams = Vec::new();
    let mut search = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("nameserver") => {
                // Link-local IPv6 nameservers carry a zone (`fe80::1%eth0`): not usable here.
                if let Some(ip) = fields.next().and_then(|a| a.parse::<IpAddr>().ok()) {
                    let addr = SocketAddr::new(ip, 53);
                    if addr != listen && !upstreams.contains(&addr) {
                        upstreams.push(addr);
                    }
                }
            }
            // The last `search` or `domain` line wins, as in glibc.
            Some("search" | "domain") => {
                search =
                    fields.map(|d| d.trim_end_matches('.').to_ascii_lowercase()).filter(|d| !d.is_empty()).collect();
            }
            _ => {}
        }
    }
    (upstreams, search)
}

/// Answers which mesh Service a name means. `hosts` are the queried name and the forms left
/// after removing each search domain (lowercase, no trailing dot), most specific first.
pub trait MeshNames: Send + Sync + 'static {
    /// The Service's virtual IPv4 addresses; `None` when no host names a mesh Service with
    /// a virtual address (the query is forwarded).
    fn lookup<'a>(&'a self, hosts: &'a [String]) -> Pin<Box<dyn Future<Output = Option<Vec<Ipv4Addr>>> + Send + 'a>>;
}

/// The hosts a query name may mean: the name and, for each search domain it ends with, the
/// name without it.
pub fn hosts_of(qname: &str, search: &[String]) -> Vec<String> {
    let name = qname.trim_end_matches('.').to_ascii_lowercase();
    let mut hosts = vec![name.clone()];
    for domain in search {
        if let Some(stripped) = name.strip_suffix(domain.as_str()).and_then(|s| s.strip_suffix('.'))
            && !stripped.is_empty()
            && !hosts.iter().any(|h| h == stripped)
        {
            hosts.push(stripped.to_string());
        }
    }
    hosts
}

/// The proxy's view of the mesh as [`MeshNames`]: a single label is a Service of the proxy's
/// own namespace; other names are the Services [`Discovery::candidates`] finds, asked of the
/// control plane on first use (waiting up to `wait`), like any destination.
pub struct DiscoveryNames {
    pub discovery: Arc<Discovery>,
    pub namespace: String,
    pub wait: Duration,
}

impl MeshNames for DiscoveryNames {
    fn lookup<'a>(&'a self, hosts: &'a [String]) -> Pin<Box<dyn Future<Output = Option<Vec<Ipv4Addr>>> + Send + 'a>> {
        Box::pin(async move {
            let mut candidates: Vec<ServiceName> = Vec::new();
            for host in hosts {
                let found = if host.contains('.') {
                    self.discovery.candidates(host)
                } else {
                    vec![ServiceName::new(host.as_str(), self.namespace.as_str())]
                };
                for c in found {
                    if !candidates.contains(&c) {
                        candidates.push(c);
                    }
                }
            }
            if candidates.is_empty() {
                return None;
            }
            let snapshot = self.discovery.ensure(&candidates, self.wait).await;
            let service = candidates.iter().find_map(|c| snapshot.services.get(c))?;
            let v4: Vec<Ipv4Addr> = service
                .virtual_ips
                .iter()
                .filter_map(|ip| match ip.to_canonical() {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            (!v4.is_empty()).then_some(v4)
        })
    }
}

/// A bound DNS server (UDP and TCP on the same address).
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    state: Arc<ServerState>,
}

struct ServerState {
    settings: DnsSettings,
    names: Arc<dyn MeshNames>,
    in_flight: Arc<Semaphore>,
    tcp_clients: Arc<Semaphore>,
}

impl DnsServer {
    /// Binds the UDP socket and TCP listener; fails before serving if the address is taken.
    pub async fn bind(settings: DnsSettings, names: Arc<dyn MeshNames>) -> std::io::Result<DnsServer> {
        let listen = settings.listen;
        let err = |what: &str, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot listen on {listen} (DNS, {what}): {e}"))
        };
        let udp = UdpSocket::bind(listen).await.map_err(|e| err("UDP", e))?;
        // TCP on the port UDP got (port 0: the OS picked one).
        let tcp_addr = udp.local_addr()?;
        let tcp = TcpListener::bind(tcp_addr).await.map_err(|e| err("TCP", e))?;
        if settings.upstreams.is_empty() {
            tracing::warn!("DNS: no upstream resolver (resolv.conf): only mesh names are answered");
        }
        let state = Arc::new(ServerState {
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            tcp_clients: Arc::new(Semaphore::new(settings.max_tcp_connections.max(1))),
            settings,
            names,
        });
        Ok(DnsServer { udp, tcp, state })
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Serves until dropped (the task aborted).
    pub async fn run(self) {
        let DnsServer { udp, tcp, state } = self;
        tracing::info!(addr = %state.settings.listen, upstreams = ?state.settings.upstreams, "DNS ready");
        let tcp_task = tokio::spawn(serve_tcp(tcp, state.clone()));
        serve_udp(Arc::new(udp), state).await;
        tcp_task.abort();
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, state: Arc<ServerState>) {
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier replies surface here on some systems: keep serving.
                tracing::debug!(error = %e, "DNS: UDP receive failed");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
            if let Some(reply) = error_reply(&query, ResponseCode::ServFail) {
                let _ = socket.send_to(&reply, peer).await;
            }
            continue;
        };
        let (socket, state) = (socket.clone(), state.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = answer(&state, &query, Transport::Udp).await {
                let _ = socket.send_to(&reply, peer).await;
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<ServerState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let Ok(permit) = state.tcp_clients.clone().try_acquire_owned() else {
            continue; // Dropped: closed at once.
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_tcp_client(stream, &state).await;
        });
    }
}

async fn serve_tcp_client(mut stream: TcpStream, state: &ServerState) {
    loop {
        let idle = state.settings.tcp_idle_timeout;
        let Ok(Ok(query)) = tokio::time::timeout(idle, read_framed(&mut stream)).await else { return };
        let Ok(permit) = state.in_flight.acquire().await else { return };
        let reply = answer(state, &query, Transport::Tcp).await;
        drop(permit);
        let Some(reply) = reply else { return };
        if write_framed(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

/// Reads one length-prefixed DNS message (RFC 1035 §4.2.2).
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await? as usize;
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// The reply to one query (`None`: no reply).
async fn answer(state: &ServerState, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "DNS: malformed query");
            return error_reply(query, ResponseCode::FormErr);
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None; // A response sent to us: never answer one (no loops).
    }
    if request.metadata.op_code == OpCode::Query && request.queries.len() == 1 {
        let question = &request.queries[0];
        let hosts = hosts_of(&question.name().to_ascii(), &state.settings.search);
        if let Some(addresses) = state.names.lookup(&hosts).await {
            return mesh_reply(&request, &addresses);
        }
    }
    match forward(&state.settings, query, transport).await {
        Some(reply) => Some(reply),
        None => error_reply(query, ResponseCode::ServFail),
    }
}

/// The answer for a mesh name: its A records, or an empty NOERROR for other types.
fn mesh_reply(request: &Message, addresses: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let question = request.queries.first()?;
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    if question.query_type() == RecordType::A {
        for ip in addresses {
            reply.add_answer(Record::from_rdata(question.name().clone(), MESH_TTL, RData::A(A(*ip))));
        }
    }
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_MAX as u16);
        reply.set_edns(edns);
    }
    reply.to_vec().ok()
}

/// An error reply echoing the query's id and question (when it parses) or just its id (when
/// only the header does); `None` when the packet has no header.
fn error_reply(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let mut reply = Message::error_msg(id, OpCode::Query, code);
    if let Ok(request) = Message::from_vec(query) {
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.add_queries(request.queries);
    } else if query[2] & 0x80 != 0 {
        return None; // The QR bit: a response, never answered.
    }
    reply.to_vec().ok()
}

/// Forwards the query as received to each upstream in turn; the first answer wins.
async fn forward(settings: &DnsSettings, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    for upstream in &settings.upstreams {
        let exchange = async {
            match transport {
                Transport::Udp => forward_udp(*upstream, settings.mark, query).await,
                Transport::Tcp => forward_tcp(*upstream, settings.mark, query).await,
            }
        };
        match tokio::time::timeout(settings.timeout, exchange).await {
            Ok(Ok(reply)) => return Some(reply),
            Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "DNS: upstream failed"),
            Err(_) => tracing::debug!(%upstream, "DNS: upstream timed out"),
        }
    }
    None
}

fn upstream_socket(upstream: SocketAddr, mark: Option<u32>, kind: socket2::Type) -> std::io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(upstream);
    let protocol = if kind == socket2::Type::DGRAM { socket2::Protocol::UDP } else { socket2::Protocol::TCP };
    let socket = socket2::Socket::new(domain, kind, Some(protocol))?;
    socket.set_nonblocking(true)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    Ok(socket)
}

async fn forward_udp(upstream: SocketAddr, mark: Option<u32>, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let socket = upstream_socket(upstream, mark, socket2::Type::DGRAM)?;
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    socket.bind(&any.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A reply to this query: same id (a connected socket hears only the upstream).
        if n >= 12 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, mark: Option<u32>, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let socket = upstream_socket(upstream, mark, socket2::Type::STREAM)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let mut stream = socket.connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_and_search() {
        let listen: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let text = "# generated\nnameserver 127.0.0.1\nnameserver 10.0.0.10 ; comment\nnameserver fe80::1%eth0\n\
                    nameserver 10.0.0.10\ndomain ignored.example\nsearch Prod.svc.cluster.local. svc.cluster.local\noptions ndots:5\n";
        let (up, search) = parse_resolv_conf(text, listen);
        assert_eq!(up, vec!["10.0.0.10:53".parse::<SocketAddr>().expect("addr")]);
        assert_eq!(search, vec!["prod.svc.cluster.local".to_string(), "svc.cluster.local".to_string()]);
        // Not ourselves when we listen elsewhere.
        let (up, _) = parse_resolv_conf(text, DEFAULT_ADDR);
        assert_eq!(up.len(), 2);
    }

    #[test]
    fn hosts_with_search_domains_removed() {
        let search = vec!["prod.svc.cluster.local".to_string(), "example.internal".to_string()];
        assert_eq!(
            hosts_of("Reviews.Prod.svc.cluster.local.", &search),
            vec!["reviews.prod.svc.cluster.local", "reviews"]
        );
        assert_eq!(hosts_of("reviews.example.internal.", &search), vec!["reviews.example.internal", "reviews"]);
        assert_eq!(hosts_of("example.internal.", &search), vec!["example.internal"]);
        assert_eq!(hosts_of("xexample.internal", &search), vec!["xexample.internal"]);
    }

    #[test]
    fn error_replies_need_a_query_header() {
        assert!(error_reply(&[1, 2, 3], ResponseCode::FormErr).is_none());
        let mut garbage = vec![0xab, 0xcd, 0x01, 0x00];
        garbage.extend_from_slice(&[0xff; 20]);
        let reply = Message::from_vec(&error_reply(&garbage, ResponseCode::FormErr).expect("reply")).expect("parses");
        assert_eq!(reply.metadata.id, 0xabcd);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        garbage[2] = 0x81; // QR set: a response is never answered.
        assert!(error_reply(&garbage, ResponseCode::FormErr).is_none());
    }
}
