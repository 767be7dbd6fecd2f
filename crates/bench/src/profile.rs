//! Turning an SMP `PerformanceTestConfig` into runs.
//!
//! Every client is a load generator and all of them run at the same time. A client's `rps` is
//! its total over its endpoint URLs, split evenly between them (0: closed loop, max
//! throughput), and each endpoint gets the client's `connections`. `headers`, `cookies`
//! (one `Cookie` header), `contentType` and `body` (sent with POST) apply to every request.
//! What SMP does not describe (warm-up, timeout, streams, threads) comes from `base`.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};

use crate::config::{BenchConfig, Load, Protocol};
use crate::error::BenchError;
use crate::smp::{ClientProtocol, PerformanceTestConfig};

/// The runs `profile` describes, each starting from `base` (for the settings SMP lacks).
pub fn runs(profile: &PerformanceTestConfig, base: &BenchConfig) -> Result<Vec<BenchConfig>, BenchError> {
    let bad = |m: String| BenchError::Config(format!("profile: {m}"));
    if profile.clients.is_empty() {
        return Err(bad("no clients".into()));
    }
    let duration = if profile.duration.trim().is_empty() {
        base.duration
    } else {
        plexus_core::duration::parse(&profile.duration).map_err(|e| bad(format!("duration: {e}")))?
    };
    let mut out = Vec::new();
    for (i, client) in profile.clients.iter().enumerate() {
        let protocol = match client.protocol {
            ClientProtocol::Http => base.protocol.min_http(),
            ClientProtocol::Grpc => Protocol::Grpc,
            other => return Err(bad(format!("client {i}: protocol {other:?} is not supported (http or grpc)"))),
        };
        if client.endpoint_url.is_empty() {
            return Err(bad(format!("client {i}: no endpointUrl")));
        }
        if client.rps < 0 || client.connections < 0 {
            return Err(bad(format!("client {i}: rps and connections must not be negative")));
        }
        let endpoints = client.endpoint_url.len();
        let load = if client.rps == 0 {
            Load::MaxThroughput
        } else {
            Load::ConstantRate(client.rps as f64 / endpoints as f64)
        };
        let mut headers = Vec::new();
        for (name, value) in &client.headers {
            headers.push(header(name, value).map_err(|e| bad(format!("client {i}: {e}")))?);
        }
        if !client.cookies.is_empty() {
            let cookie: Vec<String> = client.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            headers.push(header("cookie", &cookie.join("; ")).map_err(|e| bad(format!("client {i}: {e}")))?);
        }
        if !client.content_type.is_empty() {
            headers.push(header("content-type", &client.content_type).map_err(|e| bad(format!("client {i}: {e}")))?);
        }
        for url in &client.endpoint_url {
            let mut c = base.clone();
            c.url = url.clone();
            c.protocol = protocol;
            c.load = load;
            c.duration = duration;
            if client.connections > 0 {
                c.connections = client.connections as usize;
            }
            c.headers.extend(headers.iter().cloned());
            if !client.body.is_empty() {
                c.body = Bytes::from(client.body.clone());
                c.method = Method::POST;
            }
            c.validate().map_err(|e| bad(format!("client {i} ({url}): {e}")))?;
            out.push(c);
        }
    }
    Ok(out)
}

impl Protocol {
    /// SMP's `http` means HTTP of whichever version the base asks for (HTTP/1.1 by default).
    fn min_http(self) -> Protocol {
        if self == Protocol::Http2 { Protocol::Http2 } else { Protocol::Http1 }
    }
}

/// Parses a header name and value.
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| format!("invalid header name {name:?}"))?;
    let v = HeaderValue::from_str(value.trim()).map_err(|_| format!("invalid value for header {name:?}"))?;
    Ok((n, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smp::Client;
    use std::time::Duration;

    #[test]
    fn clients_become_runs() {
        let profile = PerformanceTestConfig {
            smp_version: "v0.0.1".into(),
            id: String::new(),
            name: "t".into(),
            labels: Default::default(),
            clients: vec![
                Client {
                    rps: 300,
                    connections: 4,
                    endpoint_url: vec!["http://127.0.0.1:1/a".into(), "http://127.0.0.1:1/b".into()],
                    headers: [("x-test".to_string(), "1".to_string())].into(),
                    cookies: [("a".to_string(), "b".to_string()), ("c".to_string(), "d".to_string())].into(),
                    body: "hello".into(),
                    ..Client::default()
                },
                Client { rps: 0, endpoint_url: vec!["http://127.0.0.1:2/".into()], ..Client::default() },
            ],
            duration: "3s".into(),
        };
        let runs = runs(&profile, &BenchConfig::new("unused")).expect("runs");
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].load, Load::ConstantRate(150.0));
        assert_eq!(runs[0].connections, 4);
        assert_eq!(runs[0].duration, Duration::from_secs(3));
        assert_eq!(runs[0].method, Method::POST);
        assert!(runs[0].headers.iter().any(|(n, v)| n == "cookie" && v == "a=b; c=d"));
        assert_eq!(runs[1].url, "http://127.0.0.1:1/b");
        assert_eq!(runs[2].load, Load::MaxThroughput);
        assert_eq!(runs[2].connections, 10, "base default");
    }

    #[test]
    fn unsupported_profiles_fail() {
        let mut profile: PerformanceTestConfig =
            serde_json::from_str(r#"{"clients":[{"protocol":"tcp","endpointUrl":["http://x/"]}]}"#).expect("parse");
        assert!(runs(&profile, &BenchConfig::new("")).is_err());
        profile.clients[0].protocol = ClientProtocol::Http;
        profile.duration = "ten seconds".into();
        assert!(runs(&profile, &BenchConfig::new("")).is_err());
        profile.clients.clear();
        assert!(runs(&profile, &BenchConfig::new("")).is_err());
    }
}
