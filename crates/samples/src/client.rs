//! The apps' HTTP client: one HTTP/1.1 connection per call, directly or through an HTTP proxy.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::header::{HOST, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Largest upstream response body the apps accept.
const MAX_BODY: usize = 1 << 20;

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("upstream answered {0}")]
    Status(StatusCode),
    #[error("reading the response body: {0}")]
    Body(String),
    #[error("invalid JSON in the response: {0}")]
    Json(#[from] serde_json::Error),
}

/// A `host:port` to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// An upstream base URL, parsed: `http://details:9080[/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// The authority as written in the URL (`details:9080`): Host header and absolute form.
    pub(crate) authority: String,
    /// Where to connect when there is no proxy.
    pub(crate) endpoint: Endpoint,
    /// Path prefix without a trailing slash (usually empty).
    pub(crate) prefix: String,
}

/// Parses `http://HOST[:PORT][/PATH]` (the scheme may be omitted); the port defaults to 80.
fn parse_http_url(url: &str) -> anyhow::Result<(Uri, Endpoint)> {
    let with_scheme = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let uri: Uri = with_scheme.parse().with_context(|| format!("invalid URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("invalid URL {url:?}: only http:// is supported");
    }
    let Some(authority) = uri.authority() else {
        bail!("invalid URL {url:?}: no host");
    };
    if authority.as_str().contains('@') {
        bail!("invalid URL {url:?}: credentials are not supported");
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("invalid URL {url:?}: no host");
    }
    let endpoint = Endpoint { host: host.to_string(), port: authority.port_u16().unwrap_or(80) };
    Ok((uri, endpoint))
}

impl Target {
    /// Parses an upstream base URL.
    pub(crate) fn parse(url: &str) -> anyhow::Result<Target> {
        let (uri, endpoint) = parse_http_url(url)?;
        if uri.query().is_some() {
            bail!("invalid URL {url:?}: a base URL takes no query");
        }
        Ok(Target {
            authority: uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default(),
            endpoint,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// Parses an HTTP proxy setting: `http://HOST:PORT[/]` or `HOST:PORT`.
pub(crate) fn parse_proxy(value: &str) -> anyhow::Result<Endpoint> {
    let (uri, endpoint) = parse_http_url(value.trim()).context("invalid HTTP proxy")?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        bail!("invalid HTTP proxy {value:?}: a proxy URL takes no path");
    }
    Ok(endpoint)
}

/// `http_proxy`, else `HTTP_PROXY`, when set and not empty.
pub(crate) fn proxy_from_env() -> Option<String> {
    proxy_from_values(std::env::var("http_proxy").ok(), std::env::var("HTTP_PROXY").ok())
}

fn proxy_from_values(lower: Option<String>, upper: Option<String>) -> Option<String> {
    [lower, upper].into_iter().flatten().map(|v| v.trim().to_string()).find(|v| !v.is_empty())
}

/// Aborts the connection task when the call ends (completed, failed or timed out).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Makes upstream calls, through `proxy` when set.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    pub(crate) proxy: Option<Endpoint>,
    pub(crate) user_agent: HeaderValue,
}

impl Client {
    /// `GET {target}{path}` with `headers`, all within `timeout`; the body of a 2xx response
    /// as JSON. Non-2xx statuses, timeouts and connection errors are failures.
    pub(crate) async fn get_json(
        &self,
        target: &Target,
        path: &str,
        headers: &HeaderMap,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        let body = tokio::time::timeout(timeout, self.get(target, path, headers))
            .await
            .map_err(|_| CallError::Timeout(timeout))??;
        Ok(serde_json::from_slice(&body)?)
    }

    async fn get(&self, target: &Target, path: &str, headers: &HeaderMap) -> Result<Bytes, CallError> {
        let path = format!("{}{path}", target.prefix);
        let (endpoint, uri) = match &self.proxy {
            // Absolute form, as HTTP proxies (explicit-mode sidecars) expect.
            Some(proxy) => (proxy, format!("http://{}{path}", target.authority)),
            None => (&target.endpoint, path),
        };
        let stream = connect(endpoint).await?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let _connection = AbortOnDrop(tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        }));

        let mut request = Request::get(uri)
            .header(HOST, target.authority.as_str())
            .header(USER_AGENT, self.user_agent.clone())
            .body(Empty::<Bytes>::new())?;
        for (name, value) in headers {
            request.headers_mut().append(name.clone(), value.clone());
        }
        let response = sender.send_request(request).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(CallError::Status(status));
        }
        let body =
            Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(|e| CallError::Body(e.to_string()))?;
        Ok(body.to_bytes())
    }
}

/// Resolves `endpoint` and connects to the first address that accepts.
async fn connect(endpoint: &Endpoint) -> Result<TcpStream, CallError> {
    let addrs = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| CallError::Resolve { host: endpoint.host.clone(), reason: e.to_string() })?;
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(source) => CallError::Connect { addr: endpoint.to_string(), source },
        None => CallError::Resolve { host: endpoint.host.clone(), reason: "no addresses".to_string() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("http://details:9080").unwrap();
        assert_eq!(t.authority, "details:9080");
        assert_eq!(t.endpoint.host, "details");
        assert_eq!(t.endpoint.port, 9080);
        assert_eq!(t.prefix, "");

        let t = Target::parse("127.0.0.1:4000/base/").unwrap();
        assert_eq!(t.authority, "127.0.0.1:4000");
        assert_eq!(t.prefix, "/base");

        let t = Target::parse("http://[::1]:81").unwrap();
        assert_eq!(t.endpoint.host, "::1");
        assert_eq!(t.endpoint.to_string(), "[::1]:81");

        assert_eq!(Target::parse("http://ratings").unwrap().endpoint.port, 80);
        for bad in ["https://x:1", "http://", "http://u:p@x:1", "http://x:1/?q", "::"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proxies() {
        let p = parse_proxy("http://127.0.0.1:40123").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("127.0.0.1", 40123));
        assert_eq!(parse_proxy("http://127.0.0.1:40123/").unwrap(), p);
        assert_eq!(parse_proxy(" 127.0.0.1:40123 ").unwrap(), p);
        assert!(parse_proxy("http://127.0.0.1:1/x").is_err());
        assert!(parse_proxy("socks5://127.0.0.1:1").is_err());

        let some = |s: &str| Some(s.to_string());
        assert_eq!(proxy_from_values(some("http://a:1"), some("http://b:2")), some("http://a:1"));
        assert_eq!(proxy_from_values(some(" "), some("http://b:2")), some("http://b:2"));
        assert_eq!(proxy_from_values(None, None), None);
    }
}
