//! The one normalizer of request paths and methods (SPEC §5, "Authorization decides on what is
//! forwarded"): the proxy runs it on every request, inbound and outbound, before routing and
//! authorization, and forwards what it returns; `plexus explain` runs it too. So routing,
//! authorization and the application all see the same path.
//!
//! A path is normalized by
//! - decoding percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3);
//!   other percent-encodings are kept, their hex digits upper-cased (§6.2.2.1);
//! - merging repeated slashes (`//` → `/`);
//! - removing `.` and `..` segments (§5.2.4; `..` never climbs above the root). A path ending
//!   in a dot segment keeps its trailing slash (`/a/b/..` → `/a/`).
//!
//! A path is refused (the proxy answers 400 itself) when its meaning depends on who decodes it:
//! an encoded `/` (`%2F`, unless MeshConfig `http.allowEncodedSlashes` lets it through,
//! undecoded), an encoded `\` (`%5C`) or `%` (`%25`), a backslash, a NUL (`%00`) or any other
//! control character, invalid percent-encoding (`%`, `%4`, `%zz`), or a dot segment carrying
//! parameters (`..;x`, `.;x`: servlet containers strip the parameters and then climb).
//!
//! Segment parameters (`/admin;x`) are kept in the path forwarded; authorization decides on
//! both the path and the path without them ([`without_segment_parameters`]), as a servlet
//! container reads it.
//!
//! The query string is not touched: it is forwarded as received, and query matches see it as
//! received.
//!
//! Methods are matched exactly as sent (case-sensitive, RFC 9110 §9.1), and a method with a
//! lower-case letter is refused: applications that upper-case methods themselves (Werkzeug,
//! and so Flask, does) would otherwise serve `delete` as `DELETE` past a rule about `DELETE`.

use std::borrow::Cow;
use std::fmt;

/// What may change how a path is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathOptions {
    /// MeshConfig `http.allowEncodedSlashes`: `%2F` is accepted and forwarded undecoded.
    pub allow_encoded_slashes: bool,
}

/// Why a request is refused before routing (the proxy's own 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `%2F` without `http.allowEncodedSlashes`.
    EncodedSlash,
    /// `%5C`.
    EncodedBackslash,
    /// `%25`.
    EncodedPercent,
    /// A literal `\`.
    Backslash,
    /// `%00`.
    Nul,
    /// A control character (literal, or encoded as `%01`–`%1F`, `%7F`).
    ControlCharacter,
    /// `%` not followed by two hex digits.
    InvalidEncoding,
    /// `..;x` or `.;x`.
    DotSegmentParameters,
    /// Neither `/…` nor `*`.
    NotAPath,
    /// A method containing a lower-case letter.
    LowerCaseMethod,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::EncodedSlash => "encoded slash (%2F) in the path",
            Refusal::EncodedBackslash => "encoded backslash (%5C) in the path",
            Refusal::EncodedPercent => "encoded percent sign (%25) in the path",
            Refusal::Backslash => "backslash in the path",
            Refusal::Nul => "NUL (%00) in the path",
            Refusal::ControlCharacter => "control character in the path",
            Refusal::InvalidEncoding => "invalid percent-encoding in the path",
            Refusal::DotSegmentParameters => "dot segment with parameters (..;) in the path",
            Refusal::NotAPath => "the path does not start with /",
            Refusal::LowerCaseMethod => "the method is not upper-case",
        })
    }
}

impl std::error::Error for Refusal {}

/// The path as every party will read it, or why it is refused. Borrowed (no copy) when the
/// path is already normal, which is every path a well-behaved client sends.
pub fn normalize_path(path: &str, options: PathOptions) -> Result<Cow<'_, str>, Refusal> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if path.is_empty() {
        return Ok(Cow::Borrowed("/"));
    }
    if !path.starts_with('/') {
        return Err(Refusal::NotAPath);
    }
    let decoded = decode(path, options)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)?))
}

/// Whether `path` is already normal: starts with `/`; no `%`, `\` or control character; no
/// empty segment but the last (`/a/` is normal, `/a//b` is not); no `.`/`..` segment, nor one
/// starting with `.;`/`..;`. One pass over the bytes, no allocation.
pub fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    // Bytes since the last `/`: the segment being read.
    let mut start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match b {
            b'%' | b'\\' | 0..=0x1f | 0x7f => return false,
            b'/' => {
                if !normal_segment(&bytes[start..i]) || i == start {
                    return false;
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    normal_segment(&bytes[start..])
}

/// A segment that is not a dot segment, with or without parameters.
fn normal_segment(s: &[u8]) -> bool {
    !matches!(s, [b'.'] | [b'.', b'.'] | [b'.', b';', ..] | [b'.', b'.', b';', ..])
}

/// Decodes percent-encoded unreserved characters, upper-cases other encodings, and refuses
/// the ambiguous ones.
fn decode(path: &str, options: PathOptions) -> Result<String, Refusal> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Refusal::Backslash),
            0..=0x1f | 0x7f => return Err(Refusal::ControlCharacter),
            b'%' => {
                let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(Refusal::InvalidEncoding);
                };
                let (Some(hi), Some(lo)) = (hex(h), hex(l)) else { return Err(Refusal::InvalidEncoding) };
                let b = hi << 4 | lo;
                match b {
                    0 => return Err(Refusal::Nul),
                    0x01..=0x1f | 0x7f => return Err(Refusal::ControlCharacter),
                    b'/' if options.allow_encoded_slashes => out.push_str("%2F"),
                    b'/' => return Err(Refusal::EncodedSlash),
                    b'\\' => return Err(Refusal::EncodedBackslash),
                    b'%' => return Err(Refusal::EncodedPercent),
                    b if is_unreserved(b) => out.push(char::from(b)),
                    b => {
                        out.push('%');
                        out.push(char::from(HEX[usize::from(b >> 4)]));
                        out.push(char::from(HEX[usize::from(b & 0xf)]));
                    }
                }
                i += 3;
            }
            _ => {
                // Up to the next byte needing a look (all ASCII, so a char boundary).
                let next = bytes[i..]
                    .iter()
                    .position(|&b| matches!(b, b'%' | b'\\' | 0..=0x1f | 0x7f))
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Merges empty segments and removes dot segments of a decoded path starting with `/`;
/// refuses a dot segment with parameters (`;` or its encoding `%3B`).
fn remove_dot_segments(decoded: &str) -> Result<String, Refusal> {
    let mut segments: Vec<&str> = Vec::new();
    let mut directory = false;
    for segment in decoded[1..].split('/') {
        let bare = segment.split(';').next().unwrap_or(segment);
        let bare = bare.split("%3B").next().unwrap_or(bare);
        if (bare == "." || bare == "..") && bare.len() != segment.len() {
            return Err(Refusal::DotSegmentParameters);
        }
        directory = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if directory || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// A normalized path as servlet containers (Tomcat, Jetty, Spring) read it: each segment's
/// parameters (from `;`, or its encoding `%3B`, to the end of the segment) removed, and the
/// empty segments that leaves merged (`/admin;x` → `/admin`, `/a/b;c/admin` → `/a/b/admin`,
/// `/;x/admin` → `/admin`). `None` when the path has no parameters (the common case: one scan,
/// no allocation). Authorization decides on both readings ([`crate::authz::decide`]).
pub fn without_segment_parameters(path: &str) -> Option<String> {
    if !path.contains(';') && !path.contains("%3B") {
        return None;
    }
    let rest = path.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    let mut out = String::with_capacity(path.len());
    for (i, segment) in segments.iter().enumerate() {
        let end = [segment.find(';'), segment.find("%3B")].into_iter().flatten().min().unwrap_or(segment.len());
        let bare = &segment[..end];
        if bare.is_empty() && i + 1 != segments.len() {
            continue;
        }
        out.push('/');
        out.push_str(bare);
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// Refuses a method with a lower-case letter (see the module documentation); methods are
/// otherwise compared exactly as sent.
pub fn check_method(method: &str) -> Result<(), Refusal> {
    if method.bytes().any(|b| b.is_ascii_lowercase()) { Err(Refusal::LowerCaseMethod) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Refusal> {
        normalize_path(p, PathOptions::default()).map(|c| c.into_owned())
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/", "/a/b.c/d", "/public/x~y_z-1", "/a;b=c", "/.well-known/x", "/a/..b", "/a/.b", "*"] {
            assert!(matches!(normalize_path(p, PathOptions::default()), Ok(Cow::Borrowed(x)) if x == p), "{p}");
        }
    }

    #[test]
    fn normalizes() {
        let cases = [
            ("/public/../admin", "/admin"),
            ("/public/./admin", "/public/admin"),
            ("//admin", "/admin"),
            ("/public//admin///", "/public/admin/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/%7euser", "/~user"),
            ("/a;x/b", "/a;x/b"),
            ("", "/"),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refuses_ambiguous_paths() {
        let cases = [
            ("/public%2F..%2Fadmin", Refusal::EncodedSlash),
            ("/a%2fb", Refusal::EncodedSlash),
            ("/a%5cb", Refusal::EncodedBackslash),
            ("/a%255c", Refusal::EncodedPercent),
            ("/a%252e%252e/admin", Refusal::EncodedPercent),
            ("/a\\..\\admin", Refusal::Backslash),
            ("/admin%00.html", Refusal::Nul),
            ("/admin%0a", Refusal::ControlCharacter),
            ("/a%", Refusal::InvalidEncoding),
            ("/a%4", Refusal::InvalidEncoding),
            ("/a%zz", Refusal::InvalidEncoding),
            ("/a%+1", Refusal::InvalidEncoding),
            ("/public/..;x/admin", Refusal::DotSegmentParameters),
            ("/public/.;x/admin", Refusal::DotSegmentParameters),
            ("/public/..;/admin", Refusal::DotSegmentParameters),
            ("/public/%2e%2e;x/admin", Refusal::DotSegmentParameters),
            ("/public/..%3bx/admin", Refusal::DotSegmentParameters),
            ("admin", Refusal::NotAPath),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn encoded_slashes_pass_undecoded_when_allowed() {
        let allow = PathOptions { allow_encoded_slashes: true };
        assert_eq!(normalize_path("/a%2fb/./c", allow).as_deref(), Ok("/a%2Fb/c"));
        assert_eq!(normalize_path("/a%5cb", allow), Err(Refusal::EncodedBackslash));
    }

    #[test]
    fn segment_parameters_are_removed_for_the_servlet_reading() {
        for (path, want) in [
            ("/admin;x", Some("/admin")),
            ("/admin;", Some("/admin")),
            ("/a/b;c/admin", Some("/a/b/admin")),
            ("/admin%3Bx", Some("/admin")),
            ("/admin;jsessionid=1/users;v=2", Some("/admin/users")),
            ("/;x/admin", Some("/admin")),
            ("/admin/;x", Some("/admin/")),
            ("/;x", Some("/")),
            ("/admin", None),
            ("/a/b/", None),
        ] {
            assert_eq!(without_segment_parameters(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn methods_are_exact_and_upper_case() {
        assert_eq!(check_method("GET"), Ok(()));
        assert_eq!(check_method("M-SEARCH"), Ok(()));
        for m in ["get", "Delete", "dELETE", "purge"] {
            assert_eq!(check_method(m), Err(Refusal::LowerCaseMethod), "{m}");
        }
    }
}

/// Property tests: normalizing is idempotent and agrees with its fast path, and what a policy
/// decides on the normalized path is what it decides on the path a reference backend makes of
/// the request (full percent-decoding, dot segments removed, slashes merged — Werkzeug's
/// decoding plus a resolver), so no spelling the proxy forwards can mean something else
/// behind it.
#[cfg(test)]
mod props {
    use super::*;
    use crate::authz::{self, Authorization, AuthzPolicy, AuthzRequest, AuthzRule, Operations, PolicyKind};
    use crate::resource::{AuthorizationAction, DefaultAuthorization};
    use proptest::prelude::*;
    use std::sync::Arc;

    const TOKENS: &[&str] = &[
        "/", "/", "/", "a", "public", "private", "admin", "health", ".", "..", "%2e", "%2E", "%2F", "%2f", "%5c",
        "%25", "%61", "%41", "%7E", "%7e", "%20", "%3b", "%3B", ";", ";x", "%", "%4", "%zz", "\\", "~", "-", "x.y",
        "%C3%A9", "%00", "%0a", "%3F", "*",
    ];

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(TOKENS), 0..12).prop_map(|t| format!("/{}", t.concat()))
    }

    /// What a backend that decodes everything makes of a path.
    fn reference(path: &str) -> String {
        let bytes = path.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let (Some(h), Some(l)) =
                    (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b)))
            {
                out.push(h << 4 | l);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        let decoded = String::from_utf8_lossy(&out).into_owned();
        let mut segments: Vec<&str> = Vec::new();
        for s in decoded.split('/') {
            match s {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                s => segments.push(s),
            }
        }
        let directory = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
        let mut r = format!("/{}", segments.join("/"));
        if directory && !segments.is_empty() {
            r.push('/');
        }
        r
    }

    fn policy(name: &str, action: AuthorizationAction, paths: &[&str]) -> Arc<AuthzPolicy> {
        Arc::new(AuthzPolicy {
            name: name.into(),
            kind: PolicyKind::AuthorizationPolicy,
            action,
            routes: Vec::new(),
            rules: vec![AuthzRule {
                from: None,
                to: Some(Operations { paths: paths.iter().map(|p| p.to_string()).collect(), ..Default::default() }),
            }],
        })
    }

    fn decision(authz: &Authorization, path: &str) -> bool {
        let headers = http::HeaderMap::new();
        let req = AuthzRequest { peer: None, method: "GET", path, port: 80, route: None, headers: &headers };
        authz::decide(authz, &req, DefaultAuthorization::Allow).allowed
    }

    /// What a servlet container makes of a raw path: each segment's parameters removed (on
    /// the raw path, before decoding), then decoded and resolved.
    fn servlet(path: &str) -> String {
        let stripped: Vec<&str> = path.split('/').map(|s| s.split(';').next().unwrap_or(s)).collect();
        reference(&stripped.join("/"))
    }

    proptest! {
        /// Whatever the proxy allows, a servlet container's reading of the same request is
        /// allowed too (and so is the plain reading: the test above).
        #[test]
        fn allowed_means_allowed_for_a_servlet_container(p in path()) {
            let authz = Authorization {
                policies: vec![
                    policy("deny-admin", AuthorizationAction::Deny, &["/public/admin*", "/admin", "/admin/*"]),
                    policy("allow-public", AuthorizationAction::Allow, &["/public/*", "/health", "/a/public/*"]),
                ],
            };
            if let Ok(n) = normalize_path(&p, PathOptions::default())
                && decision(&authz, &n)
            {
                prop_assert!(decision(&authz, &servlet(&p)), "{} → {} allowed, servlet reads {}", p, n, servlet(&p));
            }
        }

        #[test]
        fn idempotent_and_agrees_with_the_fast_path(p in path(), allow in any::<bool>()) {
            let options = PathOptions { allow_encoded_slashes: allow };
            if let Ok(n) = normalize_path(&p, options) {
                let again = normalize_path(&n, options);
                prop_assert_eq!(again.as_deref(), Ok(&*n));
                prop_assert!(is_normal(&n) || n.contains('%'), "{} → {}", p, n);
            }
            if is_normal(&p) {
                let same = normalize_path(&p, options);
                prop_assert_eq!(same.as_deref(), Ok(p.as_str()));
            }
        }

        #[test]
        fn decisions_agree_with_a_reference_decoder(p in path()) {
            let authz = Authorization {
                policies: vec![
                    policy("deny-admin", AuthorizationAction::Deny, &["/public/admin*", "/admin", "/admin/*"]),
                    policy("allow-public", AuthorizationAction::Allow, &["/public/*", "/health", "/a/public/*"]),
                ],
            };
            if let Ok(n) = normalize_path(&p, PathOptions::default()) {
                let allowed = decision(&authz, &n);
                prop_assert_eq!(allowed, decision(&authz, &reference(&n)), "{} → {} → {}", p, n, reference(&n));
                prop_assert_eq!(allowed, decision(&authz, &reference(&p)), "{} → {} vs {}", p, n, reference(&p));
            }
        }
    }
}
