//! The target URL: parsed once, resolved once (every connection goes to the same address).

use std::net::SocketAddr;

use http::Uri;
use http::uri::{Authority, PathAndQuery};

use crate::error::BenchError;

/// A parsed and resolved `http://` target.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// `host:port` as written in the URL (the default `Host`/`:authority`).
    pub authority: Authority,
    /// Path and query sent in every request.
    pub path: PathAndQuery,
    /// Where connections go.
    pub addr: SocketAddr,
}

impl Target {
    /// Parses `url` (only `http://`: the mesh's plaintext ports and gateways) and resolves its
    /// host; the first address wins, as curl does.
    pub async fn resolve(url: &str) -> Result<Target, BenchError> {
        let bad = |why: &str| BenchError::Url { url: url.to_string(), why: why.to_string() };
        let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("https is not supported: point it at a plaintext port or gateway")),
            Some(other) => return Err(bad(&format!("unsupported scheme {other:?} (use http://)"))),
            None => return Err(bad("expected an absolute URL such as http://127.0.0.1:8080/")),
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info in URLs is not supported"));
        }
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let path = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| BenchError::Resolve { host: host.clone(), why: e.to_string() })?
            .next()
            .ok_or_else(|| BenchError::Resolve { host: host.clone(), why: "no addresses".into() })?;
        Ok(Target { url: url.to_string(), authority, path, addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_and_resolves() {
        let t = Target::resolve("http://127.0.0.1:8080/a/b?c=d").await.expect("valid");
        assert_eq!(t.addr, "127.0.0.1:8080".parse::<SocketAddr>().expect("addr"));
        assert_eq!(t.path.as_str(), "/a/b?c=d");
        assert_eq!(t.authority.as_str(), "127.0.0.1:8080");
        let t = Target::resolve("http://[::1]:81").await.expect("valid");
        assert_eq!(t.addr.port(), 81);
        assert_eq!(t.path.as_str(), "/");
    }

    #[tokio::test]
    async fn rejects_what_it_cannot_use() {
        for bad in ["https://127.0.0.1/", "ftp://x/", "/relative", "http://u:p@127.0.0.1/", "not a url"] {
            assert!(Target::resolve(bad).await.is_err(), "{bad} accepted");
        }
    }
}
