//! HTTP proxying: the server side, routing (outbound), forwarding through pooled upstream
//! connections, upgrades, and per-request metrics and access logs.

pub mod access_log;
pub mod admit;
pub mod body;
pub mod client;
pub mod deadline;
pub mod forward;
pub mod h1_client;
pub mod h1_codec;
pub mod h1_server;
pub mod h2_client;
pub mod h2_server;
pub mod headers;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod retry;
pub mod server;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::http::body::ReceivedBody;
use http::{Method, Request, Response, Uri, Version, header};
use hyper_util::rt::TokioIo;

use self::body::Body;
use self::client::Proto;
use crate::error::ProxyError;
use crate::proxy::State;
use crate::transport::tcp;

/// Where and how one request is sent.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub proto: Proto,
    /// The authority the application should see (`reviews:9080`).
    pub authority: &'a str,
    /// Set when the peer is a sidecar and the application behind it speaks HTTP/1.
    pub app_http1_behind_peer: bool,
    /// The peer sidecar's SPIFFE ID (mutual TLS when this proxy has a certificate).
    pub peer_identity: Option<std::sync::Arc<str>>,
}

/// The authority a request addressed ([`Head::shared_authority`]).
#[derive(Debug, Clone)]
pub enum SharedAuthority {
    Uri(http::uri::Authority),
    /// A `Host` value that is a string.
    Host(http::HeaderValue),
}

impl SharedAuthority {
    pub fn as_str(&self) -> &str {
        match self {
            SharedAuthority::Uri(a) => a.as_str(),
            SharedAuthority::Host(h) => h.to_str().unwrap_or_default(),
        }
    }
}

/// The request head, kept so a request whose body is empty can be re-sent to another endpoint.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: http::HeaderMap,
}

impl Head {
    /// The head of `req`, its headers moved out (nothing reads them from the request
    /// afterwards: the request is kept only for its body and upgrade).
    pub fn take<B>(req: &mut Request<B>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: std::mem::take(req.headers_mut()),
        }
    }

    /// Whether `req` (this its head) is an upgrade the proxy carries out: a WebSocket upgrade
    /// ([`headers::is_upgrade`]) on an HTTP/1.1 connection that can be handed over. Only
    /// hyper's HTTP/1 server hands one over, and it marks the requests that ask (ours passes
    /// every connection whose request asks for an upgrade to it, `h1_server.rs`): the headers
    /// of the others are not looked at.
    pub fn upgrades<B>(&self, req: &Request<B>) -> bool {
        self.version != Version::HTTP_2
            && req.extensions().get::<hyper::upgrade::OnUpgrade>().is_some()
            && headers::is_upgrade(&self.headers)
    }

    /// [`Head::authority`] as a value of its own: a shared copy of the received bytes (no new
    /// string), so the head can change while it is in use.
    pub fn shared_authority(&self) -> Option<SharedAuthority> {
        self.uri.authority().cloned().map(SharedAuthority::Uri).or_else(|| {
            let host = self.headers.get(header::HOST).filter(|h| h.to_str().is_ok())?;
            Some(SharedAuthority::Host(host.clone()))
        })
    }

    /// The authority the client addressed: absolute-form URI or `:authority`, else `Host`.
    pub fn authority(&self) -> Option<&str> {
        self.uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| self.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
    }

    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    }

    /// Builds the request sent upstream: origin-form with `Host` for HTTP/1, absolute URI
    /// (`:authority`) for HTTP/2; hop-by-hop headers removed.
    pub fn upstream_request(
        &self,
        target: &Target<'_>,
        body: Body,
        upgrade: bool,
    ) -> Result<Request<Body>, ProxyError> {
        self.upstream_request_with(self.headers.clone(), target, body, upgrade)
    }

    /// [`Head::upstream_request`] with the head's own headers moved into the request. With
    /// `keep_copy` (another try may follow) the head keeps a copy of them, else none. Sending
    /// the original rather than a copy matters: the pool parses an HTTP/1 response into the
    /// map of the request it sent (and gives that map back when the try fails,
    /// [`client::SendError`]), and the original has room for the response's headers, where a
    /// copy (sized to its entries) would have to grow.
    pub fn take_upstream_request(
        &mut self,
        target: &Target<'_>,
        body: Body,
        keep_copy: bool,
    ) -> Result<Request<Body>, ProxyError> {
        let kept = if keep_copy { self.headers.clone() } else { http::HeaderMap::new() };
        let headers = std::mem::replace(&mut self.headers, kept);
        self.upstream_request_with(headers, target, body, false)
    }

    fn upstream_request_with(
        &self,
        mut headers: http::HeaderMap,
        target: &Target<'_>,
        body: Body,
        upgrade: bool,
    ) -> Result<Request<Body>, ProxyError> {
        let pq = self.path_and_query();
        headers::strip_hop_by_hop(&mut headers, upgrade);
        // Identity comes from mTLS only: a client-supplied certificate header is never passed
        // on, so no application can be fooled by a forged one (a request from another sidecar
        // carries one or two of them; most others none).
        headers::remove_present(&mut headers, &[headers::FORWARDED_CLIENT_CERT, headers::SOURCE, headers::ORIG_PROTO]);
        let (uri, version) = match target.proto {
            Proto::Http1 => {
                // Usually the client's own Host already says it: kept as it is.
                if headers.get(header::HOST).is_none_or(|h| h.as_bytes() != target.authority.as_bytes()) {
                    let host = http::HeaderValue::from_str(target.authority)
                        .map_err(|_| ProxyError::BadRequest("invalid authority".into()))?;
                    headers.insert(header::HOST, host);
                }
                // Origin form: the client's path and query as they are (shared, not re-parsed).
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(
                    self.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                );
                (Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid path".into()))?, Version::HTTP_11)
            }
            Proto::Http2 => {
                headers.remove(header::HOST);
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(target.authority)
                    .path_and_query(pq)
                    .build()
                    .map_err(|_| ProxyError::BadRequest(format!("invalid authority {:?}", target.authority)))?;
                (uri, Version::HTTP_2)
            }
        };
        if target.app_http1_behind_peer {
            headers.insert(headers::ORIG_PROTO, http::HeaderValue::from_static("HTTP/1.1"));
        }
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        Ok(req)
    }
}

/// Prepares a response from upstream for the client: hop-by-hop headers removed, version set
/// for the client's connection. Its body stays unboxed: the observation boxes it once
/// ([`observe::Observation::respond`]).
pub fn downstream_response<B>(mut resp: Response<B>, client_version: Version) -> Response<B> {
    let upgrade = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(resp.headers_mut(), upgrade);
    *resp.version_mut() = if client_version == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    resp
}

/// Forwards an Upgrade request (WebSocket…) on a dedicated HTTP/1 connection and, after
/// `101 Switching Protocols`, splices the two upgraded connections together.
pub async fn forward_upgrade(
    state: &Arc<State>,
    mut req: Request<ReceivedBody>,
    head: &Head,
    target: &Target<'_>,
) -> Result<Response<client::UpstreamBody>, ProxyError> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let target = Target { proto: Proto::Http1, app_http1_behind_peer: false, ..target.clone() };
    let up_req = head.upstream_request(&target, body::boxed(req.into_body()), true)?;
    let mut resp = state.pool.send_upgrade(target.addr, up_req, target.peer_identity.as_ref()).await?;
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let idle = state.settings.limits.idle_timeout;
        tokio::spawn(async move {
            match tokio::join!(client_upgrade, upstream_upgrade) {
                (Ok(client), Ok(upstream)) => {
                    if let (_, Err(e)) = tcp::forward(TokioIo::new(client), TokioIo::new(upstream), idle).await {
                        tracing::debug!(error = %e, "upgraded stream ended");
                    }
                }
                (c, u) => tracing::debug!(client = ?c.err(), upstream = ?u.err(), "upgrade failed"),
            }
        });
    }
    Ok(resp.map(client::UpstreamBody::Hyper))
}
