//! Small helpers: ids, URL decoding, cookies, HTML escaping and responses.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, COOKIE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

/// The response type of every app.
pub(crate) type Resp = Response<Full<Bytes>>;

/// A product id: ASCII digits only (no sign), fitting in a `u32`.
pub(crate) fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`), lossily as UTF-8.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            if let Some(decoded) = hex {
                out.push(decoded);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes everything but `A-Z a-z 0-9 - _ .` as `%XX` (for cookie values).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The first value of `name` in an `application/x-www-form-urlencoded` string (a URL query or
/// a form body), decoded.
pub(crate) fn form_param(form: &str, name: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key, true) == name).then(|| percent_decode(value, true))
    })
}

/// The value of cookie `name` in the request's `Cookie` headers, percent-decoded.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key.trim() == name).then(|| percent_decode(value.trim().trim_matches('"'), false))
    })
}

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A response with a body and a content type.
pub(crate) fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    response(status, "application/json", value.to_string())
}

/// An HTML response.
pub(crate) fn html(status: StatusCode, body: String) -> Resp {
    response(status, "text/html; charset=utf-8", body)
}

/// A JSON error response: `{"error": message}`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Resp {
    json(status, &serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(parse_id("0"), Some(0));
        assert_eq!(parse_id("42"), Some(42));
        for bad in ["", "-1", "+1", "a", "1a", "99999999999"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c", true), "a b c");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("100%", true), "100%");
        assert_eq!(percent_decode("%zz%4", true), "%zz%4");
        assert_eq!(percent_decode("%+f", true), "% f");
        assert_eq!(percent_decode("%C3%A9", true), "é");
        assert_eq!(percent_encode("jason doe/é"), "jason%20doe%2F%C3%A9");
        assert_eq!(percent_decode(&percent_encode("jason doe/é"), false), "jason doe/é");
    }

    #[test]
    fn forms_and_cookies() {
        assert_eq!(form_param("a=1&u=jason&u=x", "u").as_deref(), Some("jason"));
        assert_eq!(form_param("u", "u").as_deref(), Some(""));
        assert_eq!(form_param("username=j+d", "username").as_deref(), Some("j d"));
        assert_eq!(form_param("a=1", "u"), None);
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=b; user=jason"));
        headers.append(COOKIE, HeaderValue::from_static("user=other"));
        assert_eq!(cookie(&headers, "user").as_deref(), Some("jason"));
        assert_eq!(cookie(&headers, "nope"), None);
    }

    #[test]
    fn escaping() {
        assert_eq!(html_escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
