//! What every request passes before routing and authorization, inbound and outbound (SPEC §5,
//! "Authorization decides on what is forwarded"): its method and path as
//! [`plexus_core::normalize`] reads them — the normalized path replaces the received one, so it
//! is what routes, policies and the application all see — and exactly one `Host` on HTTP/1.1
//! (none, or two that could be read differently, is answered 400 and never forwarded).
//! The query string is left as received.

use std::borrow::Cow;

use http::{Method, Uri, Version, header};
use plexus_core::normalize::{self, PathOptions};

use super::Head;
use crate::error::ProxyError;
use crate::proxy::State;

/// Checks `head` and normalizes its path in place; an error is the proxy's own 400.
/// Allocation-free when the path is already normal.
pub fn admit(state: &State, head: &mut Head) -> Result<(), ProxyError> {
    normalize::check_method(head.method.as_str()).map_err(|r| ProxyError::BadRequest(r.to_string()))?;
    hosts(head)?;
    if head.method == Method::CONNECT {
        return Ok(());
    }
    let path = head.uri.path();
    if normalize::is_normal(path) {
        return Ok(());
    }
    let options = PathOptions { allow_encoded_slashes: state.discovery.current().mesh.allow_encoded_slashes };
    let normal = match normalize::normalize_path(path, options) {
        Ok(Cow::Owned(p)) => p,
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Err(r) => return Err(ProxyError::BadRequest(r.to_string())),
    };
    let path_and_query = match head.uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = head.uri.clone().into_parts();
    parts.path_and_query =
        Some(path_and_query.parse().map_err(|_| ProxyError::BadRequest("invalid normalized path".into()))?);
    head.uri = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid normalized path".into()))?;
    Ok(())
}

/// One `Host` at most, and exactly one on HTTP/1.1 (RFC 9112 §3.2); `CONNECT` names its
/// authority in the request line.
fn hosts(head: &Head) -> Result<(), ProxyError> {
    let mut hosts = head.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header".into()));
    }
    if first.is_none() && head.version == Version::HTTP_11 && head.method != Method::CONNECT {
        return Err(ProxyError::BadRequest("no Host header".into()));
    }
    Ok(())
}
