//! The request sent again and again, prepared once: each send clones its parts (the URI and
//! body are reference-counted; the header map is the one allocation that grows with it).

use bytes::{BufMut as _, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version};
use http_body_util::Full;

use crate::config::{BenchConfig, Protocol};
use crate::error::BenchError;
use crate::target::Target;

/// A prepared request.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Template {
    /// Builds the request for `config` against `target`.
    ///
    /// HTTP/1.1 uses the origin form (`/path`) with a `Host` header; HTTP/2 an absolute URI
    /// whose authority becomes `:authority`. A user `Host` header replaces the URL's
    /// authority in both, so a mesh route can be chosen while connecting elsewhere.
    pub(crate) fn new(config: &BenchConfig, target: &Target) -> Result<Template, BenchError> {
        let mut headers = HeaderMap::new();
        let mut authority = target.authority.clone();
        for (name, value) in &config.headers {
            if name == HOST {
                authority = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<Authority>().ok())
                    .ok_or_else(|| BenchError::Config(format!("invalid Host header {value:?}")))?;
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        let mut path = target.path.clone();
        let mut method = config.method.clone();
        let mut body = config.body.clone();
        if config.protocol == Protocol::Grpc {
            if let Some(m) = &config.grpc_method {
                let p = format!("/{}", m.trim_start_matches('/'));
                path = p.parse::<PathAndQuery>().map_err(|e| BenchError::Config(format!("gRPC method {m:?}: {e}")))?;
            }
            if path.path().matches('/').count() != 2 || path.path().ends_with('/') {
                return Err(BenchError::Config(format!(
                    "gRPC method must be package.Service/Method (from --grpc-method or the URL path), got {:?}",
                    path.path()
                )));
            }
            method = Method::POST;
            body = grpc_frame(&config.body);
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        let (uri, version) = if config.protocol.multiplexed() {
            let uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(|e| BenchError::Config(e.to_string()))?;
            (uri, Version::HTTP_2)
        } else {
            let host = HeaderValue::from_str(authority.as_str()).map_err(|e| BenchError::Config(e.to_string()))?;
            headers.insert(HOST, host);
            if !config.keepalive {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            (Uri::from(path), Version::HTTP_11)
        };
        Ok(Template { method, uri, version, headers, body })
    }

    /// A fresh copy of the request.
    pub(crate) fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// One gRPC message: uncompressed flag, big-endian length, the serialized message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    // Length checked by BenchConfig::validate.
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn target(url: &str) -> Target {
        Target::resolve(url).await.expect("target")
    }

    #[tokio::test]
    async fn http1_origin_form_with_host() {
        let mut c = BenchConfig::new("http://127.0.0.1:9/p?q=1");
        c.headers.push((http::HeaderName::from_static("x-a"), HeaderValue::from_static("b")));
        let t = Template::new(&c, &target(&c.url).await).expect("template");
        let r = t.request();
        assert_eq!(r.uri().to_string(), "/p?q=1");
        assert_eq!(r.headers()[HOST], "127.0.0.1:9");
        assert_eq!(r.headers()["x-a"], "b");
        assert!(r.headers().get(CONNECTION).is_none());
        c.keepalive = false;
        c.headers.push((HOST, HeaderValue::from_static("reviews.default:9080")));
        let r = Template::new(&c, &target(&c.url).await).expect("template").request();
        assert_eq!(r.headers()[HOST], "reviews.default:9080");
        assert_eq!(r.headers()[CONNECTION], "close");
    }

    #[tokio::test]
    async fn http2_absolute_uri() {
        let mut c = BenchConfig::new("http://127.0.0.1:9/p");
        c.protocol = Protocol::Http2;
        c.headers.push((HOST, HeaderValue::from_static("svc.ns")));
        let r = Template::new(&c, &target(&c.url).await).expect("template").request();
        assert_eq!(r.uri().to_string(), "http://svc.ns/p");
        assert_eq!(r.version(), Version::HTTP_2);
        assert!(r.headers().get(HOST).is_none());
    }

    #[tokio::test]
    async fn grpc_framing_and_method() {
        let mut c = BenchConfig::new("http://127.0.0.1:9/");
        c.protocol = Protocol::Grpc;
        c.body = Bytes::from_static(b"\x0a\x03abc");
        assert!(Template::new(&c, &target(&c.url).await).is_err(), "no method named");
        c.grpc_method = Some("helloworld.Greeter/SayHello".into());
        let r = Template::new(&c, &target(&c.url).await).expect("template").request();
        assert_eq!(r.uri().path(), "/helloworld.Greeter/SayHello");
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
        let body = r.into_body();
        let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body))
            .expect("ready")
            .expect("infallible")
            .to_bytes();
        assert_eq!(&bytes[..], b"\x00\x00\x00\x00\x05\x0a\x03abc");
    }
}
