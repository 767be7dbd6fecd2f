//! Trace context propagation: reading W3C Trace Context (`traceparent`/`tracestate`) and B3
//! (multi-header `x-b3-*` and single-header `b3`) from a request, continuing the trace with a
//! span of this proxy, and writing the headers for the next hop.
//!
//! Every proxy hop is a span of its own: the trace id is kept, a new span id is made, and the
//! span id the request arrived with becomes the parent. The next hop gets W3C headers always,
//! and B3 in each form the request carried, so an application that copies tracing headers
//! from its inbound requests to its outbound ones keeps the trace whatever library it uses.
//!
//! Precedence when several are present: a valid `traceparent`, then `b3`, then `x-b3-*`. An
//! invalid one is ignored (and with an invalid `traceparent`, `tracestate` too, as the W3C
//! specification requires); with nothing valid, a new trace starts.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

// Header names are `HeaderName` constants: looking a header up by `&str` parses and checks
// the name on every call, and these are looked up on every request.
/// W3C Trace Context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3 single-header form.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// B3 multi-header form.
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Every header this module reads or writes.
static ALL: [HeaderName; 8] =
    [TRACEPARENT, TRACESTATE, B3, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED, B3_FLAGS];

/// Which of [`ALL`] a request carries: bit `i` for `ALL[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Present(u8);

impl Present {
    const TRACEPARENT: u8 = 1;
    const TRACESTATE: u8 = 1 << 1;
    const B3: u8 = 1 << 2;
    /// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled` and `x-b3-flags` (not the parent's id).
    const B3_MULTI: u8 = 1 << 3 | 1 << 4 | 1 << 6 | 1 << 7;

    /// One pass over `headers`' names, instead of a lookup (a hash of the name) for each of
    /// the eight: most requests carry none, a request from another sidecar only `traceparent`.
    fn of(headers: &HeaderMap) -> Present {
        let mut bits = 0;
        for k in headers.keys() {
            if let Some(i) = ALL.iter().position(|h| h == k) {
                bits |= 1 << i;
            }
        }
        Present(bits)
    }

    fn any(self, bits: u8) -> bool {
        self.0 & bits != 0
    }

    /// The names present, but those in `except`.
    fn names(self, except: u8) -> impl Iterator<Item = &'static HeaderName> {
        ALL.iter().enumerate().filter(move |(i, _)| (self.0 & !except) & (1 << i) != 0).map(|(_, n)| n)
    }
}

/// A 128-bit trace id (never all zeros once made or parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A 64-bit span id (never all zeros once made or parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A random, non-zero id.
    pub fn random() -> TraceId {
        loop {
            let v = fastrand::u128(..);
            if v != 0 {
                return TraceId(v.to_be_bytes());
            }
        }
    }

    /// Whether the upper 64 bits are zero (a 64-bit B3 trace id widened).
    fn is_short(&self) -> bool {
        self.0[..8].iter().all(|b| *b == 0)
    }
}

impl SpanId {
    /// A random, non-zero id.
    pub fn random() -> SpanId {
        loop {
            let v = fastrand::u64(..);
            if v != 0 {
                return SpanId(v.to_be_bytes());
            }
        }
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(to_hex(&self.0, &mut [0; 32]))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(to_hex(&self.0, &mut [0; 16]))
    }
}

/// Each byte's two lowercase hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    pairs
};

/// Writes `bytes` as lowercase hex into `out` (up to twice as long as `bytes`). Every request
/// formats a request id, a trace id and a span id: one table lookup per byte, instead of a
/// `{:02x}` formatter call per byte (which was a tenth of a proxied request's instructions).
/// (Eight bytes at a time in a 64-bit register was measured too: fewer instructions in a
/// build without LTO, ~190 more per request in the release build, where this loop is inlined
/// into its callers.)
pub(crate) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        let [high, low] = HEX_PAIRS[usize::from(*b)];
        pair[0] = high;
        pair[1] = low;
    }
}

/// [`hex_into`], as a string.
pub(crate) fn to_hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    hex_into(bytes, out);
    let written = (bytes.len() * 2).min(out.len() & !1);
    // Only ASCII digits were written.
    std::str::from_utf8(&out[..written]).unwrap_or_default()
}

/// Decodes `s` (exactly `N` bytes of hex) into bytes; `lower_only` refuses uppercase digits
/// (W3C requires lowercase; B3 readers are lenient).
fn hex<const N: usize>(s: &str, lower_only: bool) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !lower_only => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn nonzero(bytes: &[u8]) -> bool {
    bytes.iter().any(|b| *b != 0)
}

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// Bit 0: sampled.
    pub flags: u8,
}

/// Parses a `traceparent` value (W3C Trace Context level 1): `VERSION-TRACEID-PARENTID-FLAGS`,
/// lowercase hex. Version `ff` is invalid; version `00` is exactly 55 characters; a later
/// version may append fields after a `-` (only the first four are read). All-zero ids are
/// invalid.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let v = value.trim();
    if v.len() < 55 || !v.is_ascii() {
        return None;
    }
    let version = hex::<1>(&v[0..2], true)?[0];
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v.as_bytes()[55] != b'-') {
        return None;
    }
    let b = v.as_bytes();
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = hex::<16>(&v[3..35], true).filter(|t| nonzero(t))?;
    let span_id = hex::<8>(&v[36..52], true).filter(|s| nonzero(s))?;
    let flags = hex::<1>(&v[53..55], true)?[0];
    Some(TraceParent { trace_id: TraceId(trace_id), span_id: SpanId(span_id), flags })
}

/// What a B3 header (single or multi) carried: ids (both or none), a sampling decision, the
/// debug flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct B3Context {
    pub ids: Option<(TraceId, SpanId)>,
    /// The trace id was 64 bits (16 hex digits).
    pub short_trace_id: bool,
    pub sampled: Option<bool>,
    pub debug: bool,
}

/// A B3 trace id: 32 or 16 hex digits (16 is widened with leading zeros), not all zeros.
fn b3_trace_id(s: &str) -> Option<(TraceId, bool)> {
    match s.len() {
        32 => hex::<16>(s, false).filter(|t| nonzero(t)).map(|t| (TraceId(t), false)),
        16 => hex::<8>(s, false).filter(|t| nonzero(t)).map(|low| {
            let mut t = [0u8; 16];
            t[8..].copy_from_slice(&low);
            (TraceId(t), true)
        }),
        _ => None,
    }
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    hex::<8>(s, false).filter(|s| nonzero(s)).map(SpanId)
}

/// Parses the single-header form: `0`, `1` or `d` alone (a decision only), or
/// `TRACEID-SPANID[-SAMPLING[-PARENTSPANID]]` with SAMPLING `0`, `1` or `d` (debug).
pub fn parse_b3_single(value: &str) -> Option<B3Context> {
    let v = value.trim();
    let decision = |s: &str| match s {
        "0" => Some((Some(false), false)),
        "1" => Some((Some(true), false)),
        "d" => Some((Some(true), true)),
        _ => None,
    };
    let parts: Vec<&str> = v.split('-').collect();
    match parts.as_slice() {
        [only] => {
            let (sampled, debug) = decision(only)?;
            Some(B3Context { ids: None, short_trace_id: false, sampled, debug })
        }
        [trace, span, rest @ ..] if rest.len() <= 2 => {
            let (trace_id, short) = b3_trace_id(trace)?;
            let span_id = b3_span_id(span)?;
            let (sampled, debug) = match rest.first() {
                Some(s) => decision(s)?,
                None => (None, false),
            };
            if let Some(parent) = rest.get(1) {
                b3_span_id(parent)?;
            }
            Some(B3Context { ids: Some((trace_id, span_id)), short_trace_id: short, sampled, debug })
        }
        _ => None,
    }
}

/// Parses the multi-header form. Ids need both `x-b3-traceid` and `x-b3-spanid` (valid);
/// `x-b3-sampled` (`1`/`0`, or the legacy `true`/`false`) and `x-b3-flags: 1` (debug) may
/// come alone. `None` when no B3 header is present or the ids are malformed.
pub fn parse_b3_multi(headers: &HeaderMap) -> Option<B3Context> {
    let get = |n: HeaderName| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let (trace, span) = (get(B3_TRACE_ID), get(B3_SPAN_ID));
    let debug = get(B3_FLAGS) == Some("1");
    let sampled = match get(B3_SAMPLED) {
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        _ => None,
    };
    let (ids, short_trace_id) = match (trace, span) {
        (Some(t), Some(s)) => {
            let (trace_id, short) = b3_trace_id(t)?;
            (Some((trace_id, b3_span_id(s)?)), short)
        }
        (None, None) => (None, false),
        // One id without the other is malformed.
        _ => return None,
    };
    if ids.is_none() && sampled.is_none() && !debug {
        return None;
    }
    Some(B3Context { ids, short_trace_id, sampled: if debug { Some(true) } else { sampled }, debug })
}

/// The header formats a request carried, which the next hop gets too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Formats {
    pub b3_multi: bool,
    pub b3_single: bool,
}

impl Formats {
    fn of(present: Present) -> Formats {
        Formats { b3_single: present.any(Present::B3), b3_multi: present.any(Present::B3_MULTI) }
    }
}

/// This proxy's span of a request: the trace it belongs to, its own id, its parent (the
/// previous hop's span), and the sampling decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub sampled: bool,
    /// B3 debug: sampled whatever the rate, and said so to the next hop.
    pub debug: bool,
    /// Carried unchanged from a valid `traceparent`'s request.
    pub tracestate: Option<String>,
    pub formats: Formats,
    /// The trace id arrived as 64-bit B3 and is written back to B3 that way.
    short_b3_trace_id: bool,
    /// The trace headers the request carried (valid or not), to be replaced by this span's.
    carried: Present,
}

impl SpanContext {
    /// Continues the trace `headers` carry (a new span whose parent is the incoming span), or
    /// starts a new one. `sample_new` decides for a trace that arrives without a sampling
    /// decision (a new trace, or B3 ids without `sampled`).
    pub fn continue_from(headers: &HeaderMap, sample_new: impl FnOnce() -> bool) -> SpanContext {
        let present = Present::of(headers);
        if present == Present::default() {
            return SpanContext {
                trace_id: TraceId::random(),
                span_id: SpanId::random(),
                parent_span_id: None,
                sampled: sample_new(),
                debug: false,
                tracestate: None,
                formats: Formats::default(),
                short_b3_trace_id: false,
                carried: present,
            };
        }
        // Only the names present are looked up.
        let formats = Formats::of(present);
        // Exactly one traceparent: several are ambiguous, and so treated as invalid.
        let traceparent = if present.any(Present::TRACEPARENT) {
            let mut tps = headers.get_all(TRACEPARENT).iter();
            match (tps.next(), tps.next()) {
                (Some(v), None) => v.to_str().ok().and_then(parse_traceparent),
                _ => None,
            }
        } else {
            None
        };
        let b3_single = || headers.get(B3).and_then(|v| v.to_str().ok()).and_then(parse_b3_single);
        let b3 = (if formats.b3_single { b3_single() } else { None })
            .or_else(|| if formats.b3_multi { parse_b3_multi(headers) } else { None })
            .unwrap_or_default();
        let (ids, sampled, debug, short, tracestate) = if let Some(tp) = traceparent {
            // B3 of the same trace (a previous proxy wrote both) still says how to write B3
            // on: a 64-bit trace id, the debug flag.
            let same = b3.ids.is_some_and(|(t, _)| t == tp.trace_id);
            let sampled = Some(tp.flags & 1 == 1);
            let tracestate = if present.any(Present::TRACESTATE) { tracestate(headers) } else { None };
            (Some((tp.trace_id, tp.span_id)), sampled, same && b3.debug, same && b3.short_trace_id, tracestate)
        } else {
            (b3.ids, b3.sampled, b3.debug, b3.short_trace_id, None)
        };
        let sampled = debug || sampled.unwrap_or_else(sample_new);
        SpanContext {
            trace_id: ids.map(|(t, _)| t).unwrap_or_else(TraceId::random),
            span_id: SpanId::random(),
            parent_span_id: ids.map(|(_, s)| s),
            sampled,
            debug,
            tracestate,
            formats,
            short_b3_trace_id: short && ids.is_some_and(|(t, _)| t.is_short()),
            carried: present,
        }
    }

    /// `00-TRACEID-SPANID-FLAGS` for this span.
    pub fn traceparent(&self) -> [u8; 55] {
        let mut v = [0u8; 55];
        v[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id.0, &mut v[3..35]);
        v[35] = b'-';
        hex_into(&self.span_id.0, &mut v[36..52]);
        v[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        v
    }

    /// The B3 form of the trace id (16 hex digits when it arrived so).
    fn b3_trace_id(&self) -> String {
        let full = self.trace_id.to_string();
        if self.short_b3_trace_id { full[16..].to_string() } else { full }
    }

    /// Replaces the trace headers in `headers` with this span's: `traceparent` (and the
    /// carried `tracestate`) always, B3 in the forms the request came with.
    pub fn inject(&self, headers: &mut HeaderMap) {
        crate::http::headers::remove_present(headers, &ALL);
        if let Ok(v) = HeaderValue::from_bytes(&self.traceparent()) {
            self.write_headers(headers, v);
        }
    }

    /// [`inject`](Self::inject) into the headers this span was continued from
    /// ([`continue_from`](Self::continue_from)), with the `traceparent` value made by the
    /// caller (from [`traceparent`](Self::traceparent), in an allocation it shares with another
    /// value). Their trace headers are looked for only if `continue_from` saw some (most
    /// requests carry none, a request from another sidecar only `traceparent`).
    pub fn inject_with(&self, headers: &mut HeaderMap, traceparent: HeaderValue) {
        // `traceparent` is replaced by the insert that writes this span's.
        for name in self.carried.names(Present::TRACEPARENT) {
            headers.remove(name);
        }
        self.write_headers(headers, traceparent);
    }

    /// Writes this span's trace headers into `headers`, which has none.
    fn write_headers(&self, headers: &mut HeaderMap, traceparent: HeaderValue) {
        headers.insert(TRACEPARENT, traceparent);
        let mut put = |name: HeaderName, value: String| {
            if let Ok(v) = HeaderValue::try_from(value) {
                headers.insert(name, v);
            }
        };
        if let Some(ts) = &self.tracestate {
            put(TRACESTATE, ts.clone());
        }
        if self.formats.b3_multi {
            put(B3_TRACE_ID, self.b3_trace_id());
            put(B3_SPAN_ID, self.span_id.to_string());
            if let Some(p) = self.parent_span_id {
                put(B3_PARENT_SPAN_ID, p.to_string());
            }
            // Debug implies sampled: B3 sends `x-b3-flags` instead of `x-b3-sampled`.
            if self.debug {
                put(B3_FLAGS, "1".into());
            } else {
                put(B3_SAMPLED, if self.sampled { "1" } else { "0" }.into());
            }
        }
        if self.formats.b3_single {
            let decision = match (self.debug, self.sampled) {
                (true, _) => "d",
                (false, true) => "1",
                (false, false) => "0",
            };
            let mut v = format!("{}-{}-{decision}", self.b3_trace_id(), self.span_id);
            if let Some(p) = self.parent_span_id {
                v.push_str(&format!("-{p}"));
            }
            put(B3, v);
        }
    }
}

/// The `tracestate` list (several header lines joined with `,`), when present and non-empty.
fn tracestate(headers: &HeaderMap) -> Option<String> {
    let parts: Vec<&str> = headers
        .get_all(TRACESTATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn hex_is_every_byte_in_lowercase_at_every_position_and_length() {
        let all: Vec<u8> = (0..=255u8).collect();
        let expected: String = all.iter().map(|b| format!("{b:02x}")).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 24, 33] {
                let bytes = &all[start..start + len];
                let mut out = [b'?'; 80];
                hex_into(bytes, &mut out);
                assert_eq!(&out[..2 * len], &expected.as_bytes()[2 * start..2 * (start + len)], "{start} {len}");
                assert!(out[2 * len..].iter().all(|&c| c == b'?'), "wrote past the digits");
            }
        }
        // Every byte value in every lane of a word.
        for b in 0..=255u8 {
            for lane in 0..8 {
                let mut word = [0x5au8; 8];
                word[lane] = b;
                let mut out = [0u8; 16];
                hex_into(&word, &mut out);
                let expected: String = word.iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(out, expected.as_bytes(), "{b} in lane {lane}");
            }
        }
        // A shorter output takes whole bytes only.
        let mut short = [b'?'; 5];
        hex_into(&[0xab, 0xcd, 0xef], &mut short);
        assert_eq!(&short, b"abcd?");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("valid header value"));
        }
        h
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
        h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("{name} missing in {h:?}"))
    }

    /// Each name has its bit, in [`ALL`]'s order; the B3 multi-header bits are the four names
    /// that say a request used that form.
    #[test]
    fn presence_bits_name_the_trace_headers() {
        let of = |names: &[&HeaderName]| {
            let mut h = headers(&[("host", "a"), ("x-request-id", "r")]);
            for n in names {
                h.append((*n).clone(), HeaderValue::from_static("1"));
            }
            Present::of(&h)
        };
        assert_eq!(of(&[]), Present::default());
        assert_eq!(of(&[&TRACEPARENT]), Present(Present::TRACEPARENT));
        assert_eq!(of(&[&TRACESTATE]), Present(Present::TRACESTATE));
        assert_eq!(of(&[&B3]), Present(Present::B3));
        for n in [&B3_TRACE_ID, &B3_SPAN_ID, &B3_SAMPLED, &B3_FLAGS] {
            let p = of(&[n]);
            assert!(p.any(Present::B3_MULTI) && !p.any(!Present::B3_MULTI), "{n}");
        }
        let parent = of(&[&B3_PARENT_SPAN_ID]);
        assert!(parent != Present::default() && !parent.any(Present::B3_MULTI));
        let all = of(&ALL.iter().collect::<Vec<_>>());
        assert_eq!(all, Present(u8::MAX));
        let rest: Vec<&HeaderName> = all.names(Present::TRACEPARENT).collect();
        assert_eq!(rest, ALL[1..].iter().collect::<Vec<_>>());
    }

    #[test]
    fn parses_valid_traceparent() {
        let tp = parse_traceparent(&format!("00-{TRACE}-{SPAN}-01")).expect("valid");
        assert_eq!(tp.trace_id.to_string(), TRACE);
        assert_eq!(tp.span_id.to_string(), SPAN);
        assert_eq!(tp.flags, 1);
        let tp = parse_traceparent(&format!("00-{TRACE}-{SPAN}-00")).expect("valid");
        assert_eq!(tp.flags & 1, 0);
    }

    #[test]
    fn rejects_invalid_traceparents() {
        for bad in [
            format!("ff-{TRACE}-{SPAN}-01"),                  // forbidden version
            format!("00-{TRACE}-{SPAN}-01-extra"),            // version 00 has exactly 4 fields
            format!("00-{}-{SPAN}-01", "0".repeat(32)),       // all-zero trace id
            format!("00-{TRACE}-{}-01", "0".repeat(16)),      // all-zero span id
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()), // uppercase hex
            format!("00-{TRACE}-{SPAN}-0"),                   // short flags
            format!("00-{TRACE}{SPAN}-01"),                   // missing separator
            format!("0x-{TRACE}-{SPAN}-01"),                  // not hex
            format!("00_{TRACE}-{SPAN}-01"),                  // wrong separator
            format!("00-{}-{SPAN}-01", &TRACE[..30]),         // short trace id
            "".to_string(),
        ] {
            assert_eq!(parse_traceparent(&bad), None, "{bad:?} must be rejected");
        }
    }

    #[test]
    fn accepts_future_versions_with_more_fields() {
        let tp = parse_traceparent(&format!("cc-{TRACE}-{SPAN}-01-what-the-future-holds")).expect("valid");
        assert_eq!(tp.trace_id.to_string(), TRACE);
        assert!(parse_traceparent(&format!("cc-{TRACE}-{SPAN}-01")).is_some());
        assert!(parse_traceparent(&format!("cc-{TRACE}-{SPAN}-01x")).is_none());
    }

    #[test]
    fn continues_a_w3c_trace_with_a_new_span() {
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01")), ("tracestate", "congo=t61rcWkgMzE")]);
        let ctx = SpanContext::continue_from(&h, || panic!("the request carries a decision"));
        assert_eq!(ctx.trace_id.to_string(), TRACE);
        assert_ne!(ctx.span_id.to_string(), SPAN);
        assert_eq!(ctx.parent_span_id.map(|s| s.to_string()).as_deref(), Some(SPAN));
        assert!(ctx.sampled);
        let mut out = h.clone();
        ctx.inject(&mut out);
        assert_eq!(get(&out, "traceparent"), format!("00-{TRACE}-{}-01", ctx.span_id));
        assert_eq!(get(&out, "tracestate"), "congo=t61rcWkgMzE");
        assert!(!out.contains_key("b3") && !out.contains_key("x-b3-traceid"), "no B3 came in, none goes out");
    }

    #[test]
    fn honours_an_unsampled_w3c_decision() {
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        let ctx = SpanContext::continue_from(&h, || true);
        assert!(!ctx.sampled);
        let mut out = HeaderMap::new();
        ctx.inject(&mut out);
        assert!(get(&out, "traceparent").ends_with("-00"));
    }

    #[test]
    fn starts_a_new_trace_when_absent_or_invalid() {
        for h in [
            HeaderMap::new(),
            headers(&[("traceparent", &format!("00-{}-{SPAN}-01", "0".repeat(32))), ("tracestate", "a=b")]),
            headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01")), ("traceparent", "00-x")]),
        ] {
            let ctx = SpanContext::continue_from(&h, || false);
            assert_ne!(ctx.trace_id.to_string(), TRACE);
            assert_ne!(ctx.trace_id, TraceId([0; 16]));
            assert_eq!(ctx.parent_span_id, None);
            assert!(!ctx.sampled);
            assert_eq!(ctx.tracestate, None, "tracestate is dropped with an invalid traceparent");
            let mut out = h.clone();
            ctx.inject(&mut out);
            let tp = parse_traceparent(get(&out, "traceparent")).expect("a valid traceparent is written");
            assert_eq!(tp.trace_id, ctx.trace_id);
            assert_eq!(out.get_all("traceparent").iter().count(), 1);
            assert!(!out.contains_key("tracestate"));
        }
        let sampled = SpanContext::continue_from(&HeaderMap::new(), || true);
        assert!(sampled.sampled);
        assert!(sampled.traceparent().ends_with(b"-01"));
        let unsampled = SpanContext::continue_from(&HeaderMap::new(), || false);
        let expected = format!("00-{}-{}-00", unsampled.trace_id, unsampled.span_id);
        assert_eq!(&unsampled.traceparent()[..], expected.as_bytes());
    }

    #[test]
    fn new_ids_are_random() {
        let a = SpanContext::continue_from(&HeaderMap::new(), || true);
        let b = SpanContext::continue_from(&HeaderMap::new(), || true);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
    }

    #[test]
    fn b3_multi_in_b3_multi_and_w3c_out() {
        let h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "1111111111111111"),
            ("x-b3-sampled", "1"),
        ]);
        let ctx = SpanContext::continue_from(&h, || false);
        assert_eq!(ctx.trace_id.to_string(), TRACE);
        assert_eq!(ctx.parent_span_id.map(|s| s.to_string()).as_deref(), Some(SPAN));
        assert!(ctx.sampled);
        let mut out = h.clone();
        ctx.inject(&mut out);
        assert_eq!(get(&out, "x-b3-traceid"), TRACE);
        assert_eq!(get(&out, "x-b3-spanid"), ctx.span_id.to_string());
        assert_eq!(get(&out, "x-b3-parentspanid"), SPAN);
        assert_eq!(get(&out, "x-b3-sampled"), "1");
        assert_eq!(get(&out, "traceparent"), format!("00-{TRACE}-{}-01", ctx.span_id));
        assert!(!out.contains_key("b3"), "single form only when it came in");
    }

    #[test]
    fn b3_multi_sampling_flags() {
        let ids = [("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = ids.to_vec();
            all.extend_from_slice(extra);
            SpanContext::continue_from(&headers(&all), || false)
        };
        assert!(!with(&[("x-b3-sampled", "0")]).sampled);
        assert!(with(&[("x-b3-sampled", "true")]).sampled);
        // No decision: ours (the closure) decides.
        assert!(!with(&[]).sampled);
        assert!(SpanContext::continue_from(&headers(&ids), || true).sampled);
        // Debug: sampled, and passed on as x-b3-flags without x-b3-sampled.
        let debug = with(&[("x-b3-flags", "1"), ("x-b3-sampled", "0")]);
        assert!(debug.sampled && debug.debug);
        let mut out = HeaderMap::new();
        debug.inject(&mut out);
        assert_eq!(get(&out, "x-b3-flags"), "1");
        assert!(!out.contains_key("x-b3-sampled"));
        // A decision alone starts a new trace with that decision.
        let deny = SpanContext::continue_from(&headers(&[("x-b3-sampled", "0")]), || true);
        assert!(!deny.sampled);
        assert_eq!(deny.parent_span_id, None);
        // A span id without a trace id is malformed: a new trace.
        let bad = SpanContext::continue_from(&headers(&[("x-b3-spanid", SPAN), ("x-b3-sampled", "1")]), || false);
        assert!(!bad.sampled);
        assert_eq!(bad.parent_span_id, None);
    }

    #[test]
    fn b3_multi_short_trace_ids_stay_short() {
        let h = headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", SPAN), ("x-b3-sampled", "1")]);
        let ctx = SpanContext::continue_from(&h, || false);
        assert_eq!(ctx.trace_id.to_string(), "0000000000000000a3ce929d0e0e4736");
        let mut out = HeaderMap::new();
        ctx.inject(&mut out);
        assert_eq!(get(&out, "x-b3-traceid"), "a3ce929d0e0e4736");
        assert!(get(&out, "traceparent").starts_with("00-0000000000000000a3ce929d0e0e4736-"));
    }

    #[test]
    fn b3_details_survive_a_hop_that_also_wrote_w3c() {
        let first = SpanContext::continue_from(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}-d"))]), || false);
        let mut hop = HeaderMap::new();
        first.inject(&mut hop);
        let second = SpanContext::continue_from(&hop, || false);
        assert_eq!(second.trace_id, first.trace_id);
        assert_eq!(second.parent_span_id, Some(first.span_id));
        assert!(second.debug && second.sampled);
        let mut out = HeaderMap::new();
        second.inject(&mut out);
        assert_eq!(get(&out, "b3"), format!("a3ce929d0e0e4736-{}-d-{}", second.span_id, first.span_id));
    }

    #[test]
    fn b3_single_forms() {
        let full = parse_b3_single(&format!("{TRACE}-{SPAN}-1-1111111111111111")).expect("valid");
        assert_eq!(full.ids.map(|(t, s)| (t.to_string(), s.to_string())), Some((TRACE.into(), SPAN.into())));
        assert_eq!(full.sampled, Some(true));
        assert_eq!(parse_b3_single(&format!("{TRACE}-{SPAN}")).map(|b| b.sampled), Some(None));
        let debug = parse_b3_single(&format!("{TRACE}-{SPAN}-d")).expect("valid");
        assert!(debug.debug && debug.sampled == Some(true));
        assert_eq!(parse_b3_single("0"), Some(B3Context { sampled: Some(false), ..Default::default() }));
        assert_eq!(parse_b3_single("1").and_then(|b| b.sampled), Some(true));
        for bad in [
            "x".to_string(),
            format!("{TRACE}-{SPAN}-2"),
            format!("{TRACE}-{}", "0".repeat(16)),
            format!("{}-{SPAN}-1", "0".repeat(32)),
            format!("{TRACE}-{SPAN}-1-zz"),
            format!("{TRACE}-{SPAN}-1-{SPAN}-more"),
            TRACE.to_string(),
        ] {
            assert_eq!(parse_b3_single(&bad), None, "{bad:?} must be rejected");
        }
    }

    #[test]
    fn b3_single_in_b3_single_out() {
        let h = headers(&[("b3", &format!("{TRACE}-{SPAN}-0"))]);
        let ctx = SpanContext::continue_from(&h, || true);
        assert!(!ctx.sampled);
        let mut out = h.clone();
        ctx.inject(&mut out);
        assert_eq!(get(&out, "b3"), format!("{TRACE}-{}-0-{SPAN}", ctx.span_id));
        assert_eq!(get(&out, "traceparent"), format!("00-{TRACE}-{}-00", ctx.span_id));
        assert!(!out.contains_key("x-b3-traceid"));
    }

    #[test]
    fn traceparent_wins_over_b3_and_both_are_rewritten() {
        let other = "11111111111111111111111111111111";
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01")), ("b3", &format!("{other}-{SPAN}-0"))]);
        let ctx = SpanContext::continue_from(&h, || false);
        assert_eq!(ctx.trace_id.to_string(), TRACE);
        assert!(ctx.sampled);
        let mut out = h.clone();
        ctx.inject(&mut out);
        assert_eq!(get(&out, "b3"), format!("{TRACE}-{}-1-{SPAN}", ctx.span_id));
    }
}
