//! Header handling shared by every HTTP path: hop-by-hop stripping, request ids, route header
//! modifiers, gRPC detection.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use plexus_core::resource::HeaderModifier;

use crate::trace::SpanContext;

/// Tells the peer sidecar which protocol the application behind it speaks when the two
/// sidecars upgraded an HTTP/1 request to HTTP/2 between themselves.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-plexus-orig-proto");
/// Generated when absent (SPEC §5).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Never passed on: identity comes from mTLS only.
pub const FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// Between sidecars over mutual TLS: the calling workload and its Service
/// (`WORKLOAD/SERVICE`, in the namespace of the verified identity), for the destination
/// sidecar's source labels. Read only from a verified mTLS peer; never passed on (an
/// application neither sees it nor can forge it to the next hop).
pub const SOURCE: HeaderName = HeaderName::from_static("x-plexus-source");

/// Reads [`SOURCE`]: `(workload, service)`, each a DNS name (at most 253 characters of
/// `a-z`, `0-9`, `-` and `.`), else `None`.
pub fn parse_source(value: &HeaderValue) -> Option<(&str, &str)> {
    let (workload, service) = value.to_str().ok()?.split_once('/')?;
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (name(workload) && name(service)).then_some((workload, service))
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Hop-by-hop headers removed whatever their value (`Connection`, `Upgrade` and `TE` have
/// rules of their own, below). A `const`, not a `static`: in the release build the checks
/// against it are folded into the code (as a `static` they cost ~500 more instructions per
/// request; docs/PERFORMANCE.md, sixth round).
const ALWAYS_REMOVED: [HeaderName; 6] = [
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes those of `names` that `headers` has: one pass over its names says which, and only
/// those are looked up (a lookup by name hashes it), so headers without them cost no lookup.
pub fn remove_present<const N: usize>(headers: &mut HeaderMap, names: &[HeaderName; N]) {
    let mut present = [false; N];
    for k in headers.keys() {
        if let Some(i) = names.iter().position(|h| h == k) {
            present[i] = true;
        }
    }
    for (h, _) in names.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(h);
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named by `Connection`.
/// `te: trailers` is kept (gRPC needs it); `upgrade`/`connection: upgrade` are kept when the
/// request is being upgraded end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Usually only `Connection` is there (or none): one pass over the names tells, instead of
    // a lookup per hop-by-hop name.
    let (mut connection, mut others) = (false, false);
    for n in headers.keys() {
        if *n == header::CONNECTION {
            connection = true;
        } else if *n == header::TE || *n == header::UPGRADE || ALWAYS_REMOVED.contains(n) {
            others = true;
        }
    }
    if !others {
        // No `Connection` (HTTP/2, most HTTP/1.1 clients): nothing to look up or remove.
        let keep_alive_only = !connection
            || headers.get_all(header::CONNECTION).iter().all(|v| {
                let token = |t: &[u8]| t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close");
                // Usually one token: no splitting.
                token(v.as_bytes().trim_ascii())
                    || v.to_str().is_ok_and(|v| v.split(',').all(|t| token(t.trim().as_bytes())))
            });
        if keep_alive_only {
            if connection {
                headers.remove(header::CONNECTION);
            }
            if keep_upgrade {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            return;
        }
    }
    // Headers that `Connection` names: usually only `keep-alive` or `close`, which need no
    // lookup (keep-alive goes below; close names no header), so the common case allocates nothing.
    // An empty Vec does not allocate.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in ALWAYS_REMOVED {
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether an HTTP/1 request is a WebSocket upgrade (`Connection: upgrade` and exactly
/// `Upgrade: websocket`), the only upgrade the proxy carries out (SPEC §5): any other
/// (`h2c`, `TLS/1.0`, a list of protocols…) is forwarded as a plain request with its
/// `Upgrade` removed, so nothing is spliced that was not authorized request by request.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let mut upgrade = headers.get_all(header::UPGRADE).iter();
    let websocket = match (upgrade.next(), upgrade.next()) {
        (Some(v), None) => v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"),
        _ => false,
    };
    websocket
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Whether a request or response is gRPC.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(is_grpc_content_type)
}

/// Whether a `content-type` value is gRPC's.
pub fn is_grpc_content_type(value: &HeaderValue) -> bool {
    value.to_str().is_ok_and(|v| v.starts_with("application/grpc"))
}

/// Adds `x-request-id` when absent (`present`: the first value the request carries, if any),
/// then replaces the trace headers with `span`'s ([`SpanContext::inject`]); returns the request
/// id. Both values are new on every request: a generated id and the `traceparent` are
/// formatted on the stack into one shared allocation, whose copies (the observation's, the
/// retried request's headers) only count references.
///
/// Both are marked sensitive: over HTTP/2 (between sidecars, to gRPC apps) HPACK then sends
/// them as literals never indexed instead of inserting every new value into both ends'
/// dynamic tables, where each insert evicts an older entry and each lookup walks the entries
/// of the same name (docs/PERFORMANCE.md, "The mesh path, fifth round").
pub fn stamp(headers: &mut HeaderMap, span: &SpanContext, present: Option<HeaderValue>) -> HeaderValue {
    // 32 lower-case hex digits of request id, then the `traceparent`.
    let mut values = [0u8; 32 + 55];
    if present.is_none() {
        crate::trace::context::hex_into(&fastrand::u128(..).to_be_bytes(), &mut values[..32]);
    }
    values[32..].copy_from_slice(&span.traceparent());
    let shared = Bytes::from_owner(values);
    // Hex digits and dashes, written here: valid values.
    let id = present.unwrap_or_else(|| {
        let mut id = admitted_value(shared.slice(..32));
        id.set_sensitive(true);
        headers.insert(REQUEST_ID, id.clone());
        id
    });
    let mut tp = admitted_value(shared.slice(32..));
    tp.set_sensitive(true);
    span.inject_with(headers, tp);
    id
}

/// `bytes` as a header value without checking them: for bytes already known to be a valid
/// value (HTAB, SP, `0x21..=0x7E`, `0x80..=0xFF`) — a value httparse has read, digits the proxy
/// wrote — where the check would read every byte again on every request. Debug builds check.
pub fn admitted_value(bytes: Bytes) -> HeaderValue {
    debug_assert!(HeaderValue::from_maybe_shared(bytes.clone()).is_ok(), "not a header value: {bytes:?}");
    // SAFETY: `from_maybe_shared_unchecked` needs valid value bytes; every caller passes only
    // those (above).
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// Sends this request's `x-request-id` and `traceparent` indexable, once in a while per HTTP/2
/// connection ([`stamp`] marks them sensitive): HPACK then keeps each in the connection's
/// dynamic table, and the sensitive values of the following requests name it by its index —
/// h2's encoder indexes a never-indexed field's name only when the dynamic table has that
/// name — instead of spelling and Huffman-coding it, and the peer decoding and allocating it,
/// on every request. Neither value is a secret; nothing else is made indexable.
pub fn index_stamped_names(headers: &mut HeaderMap) {
    for name in [REQUEST_ID, crate::trace::context::TRACEPARENT] {
        if let Some(value) = headers.get_mut(name) {
            value.set_sensitive(false);
        }
    }
}

/// Whether a field may be sent as a trailer: not one that frames, routes, authenticates or
/// describes the message (RFC 9110 §6.5.1; the list hyper's encoder kept), not one of the
/// connection's own, nor the identity the proxy vouches for (a peer could forge it there,
/// where the head's copy is removed).
pub fn may_trail(name: &HeaderName) -> bool {
    ![
        header::AUTHORIZATION,
        header::CACHE_CONTROL,
        header::CONTENT_ENCODING,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
        header::CONTENT_TYPE,
        header::HOST,
        header::MAX_FORWARDS,
        header::SET_COOKIE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::TE,
        header::CONNECTION,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        FORWARDED_CLIENT_CERT,
        SOURCE,
        ORIG_PROTO,
    ]
    .contains(name)
}

/// Removes from a client's trailers the fields no trailer may carry ([`may_trail`]), whatever
/// the protocol on either side: a forged identity or routing field in a request's trailers
/// never reaches the next hop.
pub fn strip_trailers(trailers: &mut HeaderMap) {
    if trailers.keys().all(may_trail) {
        return;
    }
    let refused: Vec<HeaderName> = trailers.keys().filter(|n| !may_trail(n)).cloned().collect();
    for name in refused {
        trailers.remove(name);
    }
}

/// Applies a route's header modifier: `set` replaces, `add` appends, `remove` deletes.
/// Values were validated when the resource was loaded; anything invalid is skipped.
pub fn apply_modifier(headers: &mut HeaderMap, m: &HeaderModifier) {
    for h in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_str(&h.value)) {
            headers.insert(n, v);
        }
    }
    for h in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_str(&h.value)) {
            headers.append(n, v);
        }
    }
    for n in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
            headers.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive") && !h.contains_key("connection"));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-app"], "kept");
    }

    /// The common cases (no hop-by-hop header, or only `Connection: keep-alive|close`) take a
    /// shorter path with the same result; `Connection` naming another header does not.
    #[test]
    fn strips_the_common_cases_the_same_way() {
        let strip = |pairs: &[(&'static str, &'static str)], keep_upgrade: bool| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, HeaderValue::from_static(v));
            }
            strip_hop_by_hop(&mut h, keep_upgrade);
            let mut left: Vec<String> = h.iter().map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?"))).collect();
            left.sort();
            left
        };
        assert_eq!(strip(&[("host", "a"), ("connection", "keep-alive")], false), ["host: a"]);
        assert_eq!(strip(&[("host", "a"), ("connection", "Close")], false), ["host: a"]);
        assert_eq!(strip(&[("host", "a")], false), ["host: a"]);
        assert_eq!(strip(&[("host", "a"), ("connection", "keep-alive")], true), ["connection: upgrade", "host: a"]);
        assert_eq!(strip(&[("connection", "keep-alive, x-hop"), ("x-hop", "1"), ("x-app", "2")], false), ["x-app: 2"]);
        assert_eq!(
            strip(&[("connection", "keep-alive"), ("connection", "x-hop"), ("x-hop", "1")], false),
            [] as [&str; 0]
        );
        assert_eq!(strip(&[("transfer-encoding", "chunked"), ("x-app", "2")], false), ["x-app: 2"]);
        assert_eq!(strip(&[("proxy-connection", "keep-alive"), ("x-app", "2")], false), ["x-app: 2"]);
        assert_eq!(strip(&[("te", "trailers")], false), ["te: trailers"]);
    }

    #[test]
    fn only_websocket_is_an_upgrade() {
        let upgrade = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            is_upgrade(&h)
        };
        assert!(upgrade(&[("connection", "keep-alive, Upgrade"), ("upgrade", "WebSocket")]));
        assert!(!upgrade(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")]));
        assert!(!upgrade(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]));
        assert!(!upgrade(&[("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "h2c")]));
        assert!(!upgrade(&[("connection", "upgrade"), ("upgrade", "TLS/1.0")]));
        assert!(!upgrade(&[("upgrade", "websocket")]), "no Connection: upgrade");
    }

    #[test]
    fn upgrade_and_request_id() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        let span = SpanContext::continue_from(&h, || true);
        let id = stamp(&mut h, &span, None);
        assert_eq!(id.len(), 32);
        assert!(id.as_bytes().iter().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{:?}", id.to_str());
        assert_eq!(h[REQUEST_ID], id);
        let traceparent = format!("00-{}-{}-01", span.trace_id, span.span_id);
        assert_eq!(h[crate::trace::context::TRACEPARENT], traceparent.as_str());
        // New on every request: never indexed by HPACK; an id the application sent is kept as it is.
        assert!(h[REQUEST_ID].is_sensitive() && h[crate::trace::context::TRACEPARENT].is_sensitive());
        let mut app = HeaderMap::new();
        app.insert(REQUEST_ID, HeaderValue::from_static("from-the-app"));
        let kept = stamp(&mut app, &span, Some(HeaderValue::from_static("from-the-app")));
        assert!(
            kept == "from-the-app" && !kept.is_sensitive() && app[crate::trace::context::TRACEPARENT].is_sensitive()
        );
        let present = h.get(REQUEST_ID).cloned();
        assert_eq!(stamp(&mut h, &span, present), id, "an id present is kept");
        assert_eq!(h.get_all(REQUEST_ID).iter().count(), 1);
        assert_ne!(stamp(&mut HeaderMap::new(), &span, None), id, "a new id per request");
    }

    /// The trace headers a request carried are replaced by this hop's, whatever their form;
    /// a request that carried none gets `traceparent` alone.
    #[test]
    fn stamp_replaces_the_trace_headers_carried() {
        use crate::trace::context::{B3, B3_SPAN_ID, B3_TRACE_ID, TRACEPARENT, TRACESTATE};
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(incoming));
        h.append(TRACEPARENT, HeaderValue::from_static("00-ffffffffffffffffffffffffffffffff-00f067aa0ba902b7-01"));
        h.append(TRACESTATE, HeaderValue::from_static("a=1"));
        h.append(B3, HeaderValue::from_static("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"));
        h.append(B3_TRACE_ID, HeaderValue::from_static("4bf92f3577b34da6a3ce929d0e0e4736"));
        h.append(B3_SPAN_ID, HeaderValue::from_static("00f067aa0ba902b7"));
        let span = SpanContext::continue_from(&h, || false);
        stamp(&mut h, &span, None);
        let mine = format!("00-{}-{}-{}", span.trace_id, span.span_id, if span.sampled { "01" } else { "00" });
        assert_eq!(h.get_all(TRACEPARENT).iter().map(|v| v.to_str().unwrap_or("?")).collect::<Vec<_>>(), [mine]);
        assert_ne!(h[TRACEPARENT], incoming);
        assert_eq!(h.get_all(B3_SPAN_ID).iter().count(), 1);
        assert_eq!(h[B3_SPAN_ID], span.span_id.to_string().as_str());
        assert!(h[B3].to_str().is_ok_and(|v| v.contains(&span.span_id.to_string())));

        let mut plain = HeaderMap::new();
        plain.append(header::HOST, HeaderValue::from_static("a"));
        let span = SpanContext::continue_from(&plain, || true);
        stamp(&mut plain, &span, None);
        let mut names: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "traceparent", "x-request-id"]);
    }

    /// Of the names given, those present go (every value of a repeated one), the rest stay.
    #[test]
    fn remove_present_removes_every_value_of_the_names_there_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.append("traceparent", HeaderValue::from_static("a"));
        h.append("traceparent", HeaderValue::from_static("b"));
        h.append("x-app", HeaderValue::from_static("kept"));
        let names = [HeaderName::from_static("traceparent"), HeaderName::from_static("tracestate")];
        remove_present(&mut h, &names);
        assert!(!h.contains_key("traceparent") && !h.contains_key("tracestate"));
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-app"], "kept");
        remove_present(&mut h, &names);
        assert_eq!(h.len(), 1, "nothing present: nothing removed");
    }

    /// A client's trailers lose the fields no trailer may carry (identity, framing, routing)
    /// and keep the rest; trailers with nothing refused are left as they are.
    #[test]
    fn trailers_keep_only_what_a_trailer_may_carry() {
        let mut t = HeaderMap::new();
        t.insert(FORWARDED_CLIENT_CERT, HeaderValue::from_static("By=spiffe://forged"));
        t.insert(SOURCE, HeaderValue::from_static("forged/forged"));
        t.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        t.insert(header::HOST, HeaderValue::from_static("elsewhere"));
        t.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        t.insert("grpc-status-details-bin", HeaderValue::from_static("kept"));
        t.insert("x-checksum", HeaderValue::from_static("abc"));
        strip_trailers(&mut t);
        let mut names: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-status-details-bin", "x-checksum"]);
        let before = t.clone();
        strip_trailers(&mut t);
        assert_eq!(t, before, "nothing refused: unchanged");
    }
}
