//! The HTTP/1.1 wire format of the proxy's own connections (RFC 9112): on upstream connections
//! request heads written and response heads parsed, on client connections request heads parsed
//! and response heads written (httparse into `http` types), bodies framed and decoded both ways.
//! No I/O: a connection feeds it the bytes it reads and writes the bytes it makes.
//!
//! The proxy-specific HTTP/1 path (docs/PERFORMANCE.md, "What hyper costs on its own"; its
//! users: [`super::h1_client`], [`super::h1_server`]). Strict where a lenient reading could let two parties disagree on where a message
//! ends (the ground of request smuggling and response desynchronization): a response with
//! both `Transfer-Encoding` and `Content-Length`, differing lengths, a malformed chunk line,
//! a chunk not followed by CRLF, an obsolete folded header line, all end the connection with
//! an error instead of a guess. The framing headers of a request are written from its
//! [`Framing`] alone, never copied from its header map.

use std::fmt;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};

/// What an upstream may send in one head or trailer section.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of a response head (status line and header fields) or of a trailer section.
    pub max_head_bytes: usize,
    /// Header fields in a head or a trailer section (at most [`MAX_HEADERS`]).
    pub max_headers: usize,
}

/// The most header fields any head may have (the parser's slots live on the stack).
pub const MAX_HEADERS: usize = 128;

/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// A message that breaks the wire format: the connection cannot carry another message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecError(pub &'static str);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CodecError {}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Appends a request head to `out`: request line, every field of `headers` but the framing
/// ones (`Content-Length`, `Transfer-Encoding`), then the framing `framing` says. The caller
/// sets `Host` and removes hop-by-hop fields. `target` is the origin-form (or absolute-form)
/// request target; `http` types cannot hold CR, LF or NUL in any of these, so nothing written
/// here can start a line of its own.
pub fn encode_request_head(method: &Method, target: &str, headers: &HeaderMap, framing: Framing, out: &mut Vec<u8>) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_fields(headers, |name| name != http::header::CONTENT_LENGTH && name != http::header::TRANSFER_ENCODING, out);
    write_framing(framing, out);
    out.extend_from_slice(b"\r\n");
}

/// Appends the framing field `framing` calls for (none for an empty or close-delimited body).
fn write_framing(framing: Framing, out: &mut Vec<u8>) {
    match framing {
        Framing::Empty | Framing::UntilClose => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
}

/// Appends one chunk's header (its size in hex and CRLF) to `out`; the data and a CRLF follow.
/// An empty chunk would end the body: use [`encode_last_chunk`].
pub fn encode_chunk_header(len: usize, out: &mut Vec<u8>) {
    debug_assert!(len > 0, "an empty chunk ends the body");
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk and the trailer section (`trailers`, may be empty) to `out`: every
/// field but those no trailer may carry ([`super::headers::may_trail`]).
pub fn encode_last_chunk(trailers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    write_fields(trailers, super::headers::may_trail, out);
    out.extend_from_slice(b"\r\n");
}

/// Where a body's frames and its declared framing disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOverrun {
    /// More data than the `Content-Length` announced.
    Longer,
    /// The body ended before the announced length.
    Shorter,
}

impl fmt::Display for BodyOverrun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyOverrun::Longer => "is longer than its Content-Length",
            BodyOverrun::Shorter => "is shorter than its Content-Length",
        })
    }
}

/// Encodes one body frame under `framing` (both directions' bodies go through here): a data
/// frame's chunk header goes into `out` and its data is returned, to be written next and then
/// followed by [`Framing::after_data`]; a chunked body's trailers end it in `out` (trailers
/// under any other framing cannot be sent and are dropped).
pub fn encode_frame(
    frame: http_body::Frame<Bytes>,
    framing: &mut Framing,
    out: &mut Vec<u8>,
) -> Result<Option<Bytes>, BodyOverrun> {
    match frame.into_data() {
        Ok(data) if data.is_empty() => Ok(None),
        Ok(data) => {
            match framing {
                Framing::Chunked => encode_chunk_header(data.len(), out),
                Framing::Length(left) if data.len() as u64 <= *left => *left -= data.len() as u64,
                Framing::Length(_) => return Err(BodyOverrun::Longer),
                Framing::UntilClose | Framing::Empty => {}
            }
            Ok(Some(data))
        }
        Err(frame) => {
            if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), *framing) {
                encode_last_chunk(&trailers, out);
                *framing = Framing::Empty;
            }
            Ok(None)
        }
    }
}

/// Encodes the end of a body under `framing`: the last chunk, or an error if fewer bytes than
/// announced were sent.
pub fn encode_end(framing: Framing, out: &mut Vec<u8>) -> Result<(), BodyOverrun> {
    match framing {
        Framing::Chunked => {
            encode_last_chunk(&HeaderMap::new(), out);
            Ok(())
        }
        Framing::Length(left) if left > 0 => Err(BodyOverrun::Shorter),
        _ => Ok(()),
    }
}

impl Framing {
    /// What follows a data frame's bytes: the CRLF ending a chunk, or nothing.
    pub fn after_data(self) -> &'static [u8] {
        if self == Framing::Chunked { b"\r\n" } else { b"" }
    }
}

/// Appends the fields of `headers` that `keep` keeps, one `name: value` line each.
fn write_fields(headers: &HeaderMap, mut keep: impl FnMut(&HeaderName) -> bool, out: &mut Vec<u8>) {
    for (name, value) in headers {
        if keep(name) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A response head read from an upstream.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// Its fields (those of a `1xx` head are not kept: an interim response is not forwarded).
    pub headers: HeaderMap,
    /// How its body is delimited (for the request that was sent).
    pub framing: Framing,
    /// Whether the connection can carry another request once this body is read.
    pub keep_alive: bool,
}

/// Parses a response head at the start of `buf`, the answer to a `request` request: `None`
/// (and `buf` untouched) until the head is whole; once it is, its bytes are taken from `buf`.
/// A `1xx` head is returned like any other, with [`Framing::Empty`]: the final response
/// follows it (after a `101`, the connection speaks another protocol — the caller's to
/// handle). Not for the answer to a `CONNECT` (a tunnel, not a body).
///
/// A final head's fields go into `reuse`'s allocation (cleared first: the map of the request
/// just written, so no map is allocated per response), their values sharing the bytes read
/// (no copy); the connection management it acted on is left out ([`consumed`]). `reuse` is left as it was when `None`, an error or a `1xx` head is returned:
/// every check that can refuse a head runs before it is touched.
pub fn parse_response_head(
    buf: &mut BytesMut,
    request: &Method,
    limits: &Limits,
    reuse: &mut HeaderMap,
    names: &mut FieldNames,
) -> Result<Option<ResponseHead>, CodecError> {
    // Slots httparse fills; left uninitialized (4 KiB the parser would otherwise zero).
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let slots = &mut slots[..limits.max_headers.clamp(1, MAX_HEADERS)];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(CodecError("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(CodecError("too many header fields in a response head")),
        Err(_) => return Err(CodecError("malformed response head")),
    };
    if len > limits.max_head_bytes {
        return Err(CodecError("response head too large"));
    }
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(CodecError("unsupported HTTP version in a response")),
    };
    let status =
        response.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(CodecError("malformed response status"))?;
    let fields = &*response.headers;
    let present = Present::of(fields);
    let framing = response_framing(status, request, version, fields, &present)?;
    let options = present.connection_options(fields);
    let keep_alive = framing != Framing::UntilClose && options.keeps_alive(version);
    // Where each field's name and value are in the head ([offset, length] each): its values
    // are cut from the head's bytes once these are taken from `buf`. (httparse's slices point
    // into `buf`; a head is at most `max_head_bytes`, far below 4 GiB.)
    // Room for 32 on the stack (zeroing room for all 128 cost more than filling it), the
    // rest of a longer head's on the heap.
    let count = fields.len();
    let (mut on_stack, mut on_heap) = ([[0u32; 4]; 32], Vec::new());
    let spans = match on_stack.get_mut(..count) {
        Some(spans) => spans,
        None => {
            on_heap.resize(count, [0u32; 4]);
            &mut on_heap[..]
        }
    };
    let base = buf.as_ptr() as usize;
    let at = |b: &[u8]| (b.as_ptr() as usize).wrapping_sub(base) as u32;
    for (field, span) in fields.iter().zip(spans.iter_mut()) {
        let (name, value) = (field.name.as_bytes(), field.value);
        *span = [at(name), name.len() as u32, at(value), value.len() as u32];
    }
    let head = buf.split_to(len).freeze();
    if status.is_informational() {
        return Ok(Some(ResponseHead { status, version, headers: HeaderMap::new(), framing, keep_alive }));
    }
    let within = |at: u32, len: u32| {
        let (at, len) = (at as usize, len as usize);
        (at + len <= head.len()).then_some(at..at + len).ok_or(CodecError("malformed response head"))
    };
    reuse.clear();
    reuse.reserve(count);
    names.start();
    let mut kept = 0;
    for &[name_at, name_len, value_at, value_len] in spans.iter() {
        let raw = &head[within(name_at, name_len)?];
        if consumed(raw, options) {
            continue;
        }
        // httparse admits the same name and value bytes as `http` does: none of these fails.
        let name = names.name(kept, raw).map_err(|_| CodecError("invalid header name"))?;
        kept += 1;
        reuse.append(name, field_value(head.slice(within(value_at, value_len)?)));
    }
    Ok(Some(ResponseHead { status, version, headers: std::mem::take(reuse), framing, keep_alive }))
}

/// The field names of the last head read on a connection, in order, each with its bytes as
/// received. The next head from the same peer mostly repeats them (a client's requests, an
/// upstream's responses), and a name whose bytes are exactly those at its place is taken from
/// here instead of being parsed again (lower-cased and looked up among the standard names,
/// ~60 instructions a field). Bounded: the first [`NAMES_KEPT`] names of at most
/// [`NAME_KEPT_BYTES`] bytes each.
#[derive(Default)]
pub struct FieldNames {
    /// The kept names' bytes as received, one after another.
    spelled: Vec<u8>,
    /// Each kept name's length in `spelled`, and the name.
    names: Vec<(u8, HeaderName)>,
    /// Where the next name's bytes start in `spelled`, while a head is read.
    at: usize,
}

/// Names kept per connection (a head's first ones).
const NAMES_KEPT: usize = 16;
/// The longest name kept.
const NAME_KEPT_BYTES: usize = 40;

impl FieldNames {
    /// Starts reading a head's names.
    fn start(&mut self) {
        self.at = 0;
    }

    /// The `i`th name of the head being read (`i` counts up from 0 after [`Self::start`]).
    fn name(&mut self, i: usize, raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
        if let Some((len, name)) = self.names.get(i) {
            let end = self.at + usize::from(*len);
            if self.spelled.get(self.at..end) == Some(raw) {
                self.at = end;
                return Ok(name.clone());
            }
        }
        // From here on this head differs from the last: its names replace the rest (also when
        // this one is no name: none kept after it may be taken for a later name's).
        let replacing = self.names.len() >= i;
        if replacing {
            self.names.truncate(i);
            self.spelled.truncate(self.at);
        }
        let name = HeaderName::from_bytes(raw)?;
        if replacing && i < NAMES_KEPT && raw.len() <= NAME_KEPT_BYTES {
            self.names.push((raw.len() as u8, name.clone()));
            self.spelled.extend_from_slice(raw);
            self.at += raw.len();
        }
        Ok(name)
    }
}

/// A field value httparse has read, as an `http` value without checking its bytes again:
/// httparse admits exactly the bytes `http` does in a value (HTAB, SP, `0x21..=0x7E`,
/// `0x80..=0xFF`: its `HEADER_VALUE_MAP` and `HeaderValue`'s check) and refuses a head with any
/// other (`a_field_value_httparse_reads_is_one_http_admits` holds both to it). hyper's HTTP/1
/// parser does the same.
fn field_value(bytes: Bytes) -> HeaderValue {
    super::headers::admitted_value(bytes)
}

/// The `http` header map of parsed fields.
fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, CodecError> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| CodecError("invalid header name"))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| CodecError("invalid header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// RFC 9112 §6.3: how a response's body is delimited.
fn response_framing(
    status: StatusCode,
    request: &Method,
    version: Version,
    fields: &[httparse::Header<'_>],
    present: &Present,
) -> Result<Framing, CodecError> {
    if request == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let lengths = present.content_length(fields)?;
    if present.coding.any() {
        if version == Version::HTTP_10 {
            // RFC 9112 §6.1: its framing is faulty, whatever else it says.
            return Err(CodecError("Transfer-Encoding on an HTTP/1.0 response"));
        }
        if lengths.is_some() {
            return Err(CodecError("a response with both Transfer-Encoding and Content-Length"));
        }
        let chunked = chunked_last(present.coding.values(fields, "transfer-encoding"))?;
        return if chunked { Ok(Framing::Chunked) } else { Ok(Framing::UntilClose) };
    }
    Ok(match lengths {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// The values of every `name` field of the parsed `fields` (no map is built to find them).
fn named<'a>(fields: &'a [httparse::Header<'_>], name: &'static str) -> impl Iterator<Item = &'a [u8]> + use<'a> {
    fields.iter().filter(move |f| is_name(f.name.as_bytes(), name.as_bytes())).map(|f| f.value)
}

/// Whether the header name `name` (token characters, as httparse admits them) is `lower`
/// (lowercase letters and `-`), ignoring case: eight bytes at a time, each with its `0x20`
/// bit set. Among token characters only an uppercase letter becomes another character that
/// way (its lowercase), and `-` already has the bit: the comparison is exact.
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    if name.len() != lower.len() {
        return false;
    }
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    name.chunks(8).zip(lower.chunks(8)).all(|(n, l)| {
        let mask = word(&[0x20; 8][..n.len()]);
        word(n) | mask == word(l)
    })
}

/// The value of every `Content-Length` field (lists included), which must agree: `None` if
/// there is none.
fn content_length<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Result<Option<u64>, CodecError> {
    let mut length = None;
    for value in fields {
        for part in value.split(|&b| b == b',') {
            let digits = part.trim_ascii();
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err(CodecError("invalid Content-Length"));
            }
            let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(CodecError("differing Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Whether `chunked` is the last transfer coding of the `Transfer-Encoding` values `fields`
/// (and appears nowhere else).
fn chunked_last<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Result<bool, CodecError> {
    let mut codings = 0usize;
    let mut chunked_at = None;
    for coding in coding_list(fields) {
        if coding.eq_ignore_ascii_case(b"chunked") {
            if chunked_at.is_some() {
                return Err(CodecError("chunked is not the last transfer coding"));
            }
            chunked_at = Some(codings);
        }
        codings += 1;
    }
    match chunked_at {
        None if codings == 0 => Err(CodecError("an empty Transfer-Encoding")),
        None => Ok(false),
        Some(i) if i + 1 == codings => Ok(true),
        Some(_) => Err(CodecError("chunked is not the last transfer coding")),
    }
}

/// The transfer codings the `Transfer-Encoding` values `fields` list (empty elements skipped).
fn coding_list<'a>(fields: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    fields.flat_map(|v| v.split(|&b| b == b',')).map(<[u8]>::trim_ascii).filter(|c| !c.is_empty())
}

/// What a head's `Connection` values say.
#[derive(Default, Clone, Copy)]
struct ConnectionOptions {
    close: bool,
    keep_alive: bool,
    /// Another option (`upgrade`, a header name): the field is left to the layer above.
    other: bool,
}

impl ConnectionOptions {
    fn of<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Self {
        let mut options = ConnectionOptions::default();
        for value in fields {
            // Usually one option alone: no splitting.
            if is_name(value, b"keep-alive") {
                options.keep_alive = true;
                continue;
            }
            for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if option.eq_ignore_ascii_case(b"close") {
                    options.close = true;
                } else if option.eq_ignore_ascii_case(b"keep-alive") {
                    options.keep_alive = true;
                } else if !option.is_empty() {
                    options.other = true;
                }
            }
        }
        options
    }

    /// Whether a message of `version` with these options leaves its connection open.
    fn keeps_alive(self, version: Version) -> bool {
        !self.close && (version == Version::HTTP_11 || self.keep_alive)
    }
}

/// Whether a parsed field is connection management this codec has acted on, left out of the
/// head's map: `Keep-Alive`, and `Connection` when it says only `keep-alive` or `close` (what
/// [`ConnectionOptions::keeps_alive`] read). Both are hop-by-hop (RFC 9110 §7.6.1): no layer
/// above reads them and every forward removes them (`headers::strip_hop_by_hop`), which then
/// has nothing to look up or remove. A `Connection` naming anything else stays for that layer.
fn consumed(name: &[u8], options: ConnectionOptions) -> bool {
    name.len() == 10 && (is_name(name, b"keep-alive") || (!options.other && is_name(name, b"connection")))
}

/// Which of the fields that frame a message or steer its connection a head has, and where:
/// one pass over its parsed fields (by length, then name), so that only those present are
/// read, and a field that appears once is read where it is, without another search — most
/// heads have a `Content-Length` and little else of these.
#[derive(Default)]
struct Present {
    length: Seen,
    coding: Seen,
    connection: Seen,
    expect: Seen,
    upgrade: Seen,
}

/// Where a field name first appears in a head, and whether it appears again.
#[derive(Default, Clone, Copy)]
struct Seen {
    first: Option<usize>,
    again: bool,
}

impl Seen {
    fn note(&mut self, at: usize) {
        if self.first.is_some() {
            self.again = true;
        } else {
            self.first = Some(at);
        }
    }

    fn any(self) -> bool {
        self.first.is_some()
    }

    /// The values of the `name` fields this records, in order.
    fn values<'a>(self, fields: &'a [httparse::Header<'_>], name: &'static str) -> impl Iterator<Item = &'a [u8]> {
        let first = self.first.and_then(|i| fields.get(i));
        let rest = match (self.first, self.again) {
            (Some(i), true) => fields.get(i + 1..).unwrap_or_default(),
            _ => &[],
        };
        first.map(|f| f.value).into_iter().chain(named(rest, name))
    }
}

impl Present {
    /// The head's `Content-Length` ([`content_length`]); none looked for when it has none.
    fn content_length(&self, fields: &[httparse::Header<'_>]) -> Result<Option<u64>, CodecError> {
        if !self.length.any() {
            return Ok(None);
        }
        content_length(self.length.values(fields, "content-length"))
    }

    /// What the head's `Connection` fields say; none looked for when it has none.
    fn connection_options(&self, fields: &[httparse::Header<'_>]) -> ConnectionOptions {
        if !self.connection.any() {
            return ConnectionOptions::default();
        }
        ConnectionOptions::of(self.connection.values(fields, "connection"))
    }

    fn of(fields: &[httparse::Header<'_>]) -> Self {
        let mut present = Present::default();
        for (at, field) in fields.iter().enumerate() {
            let name = field.name.as_bytes();
            let seen = match name.len() {
                14 if is_name(name, b"content-length") => &mut present.length,
                17 if is_name(name, b"transfer-encoding") => &mut present.coding,
                10 if is_name(name, b"connection") => &mut present.connection,
                7 if is_name(name, b"upgrade") => &mut present.upgrade,
                6 if is_name(name, b"expect") => &mut present.expect,
                _ => continue,
            };
            seen.note(at);
        }
        present
    }
}

/// A request head read from a client.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// How its body is delimited.
    pub framing: Framing,
    /// The client asked to keep the connection open after this exchange.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// The head has an `Upgrade` field.
    pub upgrade: bool,
    /// Bytes of the head in the buffer it was parsed from.
    pub len: usize,
}

/// Why a request head was refused: answered `400 Bad Request` or, when it is too large,
/// `431 Request Header Fields Too Large`, and the connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    Malformed(&'static str),
    TooLarge,
}

/// Parses a request head at the start of `buf`: `None` until the head is whole. Strict on
/// framing (RFC 9112 §6.3): `Transfer-Encoding` on HTTP/1.0, with `Content-Length`, or without
/// `chunked` last, an invalid or ambiguous `Content-Length`, an obsolete folded line, are all
/// refused rather than read one way when the next hop could read them another.
///
/// The head's bytes are copied once into an allocation of their own, which the target and
/// every header value then share: `buf` itself is never referenced by the request, so the
/// connection's read buffer is reused as it is for the next request.
///
/// The head's fields go into `spare` (taken when a head is returned): the map of the
/// connection's last response, cleared, whose allocation is reused (as hyper's server does); the
/// connection management it acted on is left out ([`consumed`]).
pub fn parse_request_head(
    buf: &[u8],
    limits: &Limits,
    spare: &mut HeaderMap,
    names: &mut FieldNames,
) -> Result<Option<RequestHead>, HeadError> {
    // Slots left uninitialised: httparse writes those it fills (zeroing 128 of them cost more
    // than parsing a short head).
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let slots = &mut slots[..limits.max_headers.clamp(1, MAX_HEADERS)];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("malformed request head")),
    };
    if len > limits.max_head_bytes {
        return Err(HeadError::TooLarge);
    }
    let version = match request.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(HeadError::Malformed("unsupported HTTP version")),
    };
    let method = request.method.ok_or(HeadError::Malformed("malformed request line"))?;
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Malformed("invalid method"))?;
    let target = request.path.ok_or(HeadError::Malformed("malformed request line"))?;
    let fields = &*request.headers;

    // The framing and connection fields, read from the parsed fields (no map lookups).
    let present = Present::of(fields);
    let length = present.content_length(fields).map_err(|e| HeadError::Malformed(e.0))?;
    let framing = if present.coding.any() {
        if version == Version::HTTP_10 {
            return Err(HeadError::Malformed("Transfer-Encoding on an HTTP/1.0 request"));
        }
        if length.is_some() {
            return Err(HeadError::Malformed("a request with both Transfer-Encoding and Content-Length"));
        }
        match chunked_last(present.coding.values(fields, "transfer-encoding")) {
            // The body is forwarded re-framed as chunked alone: a coding under it (`gzip,
            // chunked`) would reach the next hop undeclared (RFC 9112 §6.1: not understood).
            Ok(true) if coding_list(present.coding.values(fields, "transfer-encoding")).count() == 1 => {
                Framing::Chunked
            }
            Ok(true) => return Err(HeadError::Malformed("a request transfer coding other than chunked")),
            Ok(false) => return Err(HeadError::Malformed("a request whose last transfer coding is not chunked")),
            Err(e) => return Err(HeadError::Malformed(e.0)),
        }
    } else {
        match length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    let options = present.connection_options(fields);
    let keep_alive = options.keeps_alive(version);
    let expect_continue = version == Version::HTTP_11
        && present.expect.values(fields, "expect").any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = present.upgrade.any();

    // One copy of the head; the target and the values are slices of it.
    let head = Bytes::copy_from_slice(&buf[..len]);
    // The copy of a slice of `buf` (every slice httparse returns is one).
    let copied = |part: &[u8]| {
        let at = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
        head.slice(at.min(len)..(at + part.len()).min(len))
    };
    let uri = if target == "/" {
        // Parsed once (`Uri::from_static` parses at every call); a clone copies two pointers.
        static ROOT: std::sync::LazyLock<Uri> = std::sync::LazyLock::new(|| Uri::from_static("/"));
        ROOT.clone()
    } else {
        let uri = Uri::from_maybe_shared(copied(target.as_bytes()))
            .map_err(|_| HeadError::Malformed("invalid request target"))?;
        // Authority-form is CONNECT's alone (RFC 9112 §3.2.3): on another method it would name
        // a host apart from `Host` (and the proxy routes by the target's authority first).
        if let Some(authority) = uri.authority() {
            if uri.scheme().is_none() && method != Method::CONNECT {
                return Err(HeadError::Malformed("a request target in authority-form on a request other than CONNECT"));
            }
            if authority.as_str().contains('@') {
                return Err(HeadError::Malformed("a request target with userinfo"));
            }
        }
        uri
    };
    // Room for the fields the proxy adds (request id, trace context) without growing the map
    // (a short head's map then stays under 1 KiB: the allocator's fast path).
    let mut headers = std::mem::take(spare);
    headers.clear();
    headers.reserve(fields.len() + 3);
    names.start();
    let mut kept = 0;
    for field in fields {
        let raw = field.name.as_bytes();
        if consumed(raw, options) {
            continue;
        }
        let name = names.name(kept, raw).map_err(|_| HeadError::Malformed("invalid header name"))?;
        kept += 1;
        headers.append(name, field_value(copied(field.value)));
    }
    Ok(Some(RequestHead { method, uri, version, headers, framing, keep_alive, expect_continue, upgrade, len }))
}

/// Appends a response head to `out`: status line (`version` is the client's), every field of
/// `headers` but those `framing` decides (`Content-Length`, `Transfer-Encoding`), then the
/// framing's own, `connection` if given, and `date` if `headers` has none. With
/// [`Framing::Empty`] (a `HEAD` request's answer, `304`) a `Content-Length` of `headers` is
/// kept as it is: it describes the body that was not sent.
pub fn encode_response_head(
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    connection: Option<&'static str>,
    date: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(if version == Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let keep_length = framing == Framing::Empty && status != StatusCode::NO_CONTENT && !status.is_informational();
    let mut dated = false;
    write_fields(
        headers,
        |name| {
            dated |= name == http::header::DATE;
            name != http::header::TRANSFER_ENCODING
                && (keep_length || name != http::header::CONTENT_LENGTH)
                && (connection.is_none() || name != http::header::CONNECTION)
        },
        out,
    );
    write_framing(framing, out);
    if let Some(connection) = connection {
        out.extend_from_slice(b"connection: ");
        out.extend_from_slice(connection.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// What [`BodyDecoder::decode`] found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section of a chunked body (never empty); the body ends after it.
    Trailers(HeaderMap),
    /// The body is complete; bytes left in the buffer belong to what follows.
    End,
    /// More bytes are needed.
    NeedMore,
}

/// Reads one body out of a connection's read buffer, as its framing says.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
    limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes of a `Content-Length` body left.
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// This many bytes of the current chunk left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section.
    Trailers,
    /// Everything until the connection closes.
    UntilClose,
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing, limits: Limits) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        BodyDecoder { state, limits }
    }

    /// Whether the body has been read to its end.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// What is known of the rest of the body's size.
    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.state {
            State::Length(left) => http_body::SizeHint::with_exact(left),
            State::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }

    /// Takes the next piece of the body from the front of `buf`; `closed`: the peer has closed
    /// and nothing more will arrive. Call again until [`Decoded::End`] or [`Decoded::NeedMore`].
    pub fn decode(&mut self, buf: &mut BytesMut, closed: bool) -> Result<Decoded, CodecError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::UntilClose if !buf.is_empty() => return Ok(Decoded::Data(buf.split().freeze())),
                State::UntilClose if closed => {
                    self.state = State::Done;
                    return Ok(Decoded::End);
                }
                State::Length(left) | State::ChunkData(left) if !buf.is_empty() => {
                    let take = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    let left = left - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::ChunkSize => {
                    let Some(end) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                        return self.need_more(buf.len() >= MAX_CHUNK_LINE, "chunk-size line too long", closed);
                    };
                    let line = buf.split_to(end + 1);
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return self.need_more(false, "", closed);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(CodecError("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        let _ = buf.split_to(2);
                        self.state = State::Done;
                        return Ok(Decoded::End);
                    }
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let slots = &mut slots[..self.limits.max_headers.clamp(1, MAX_HEADERS)];
                    match httparse::parse_headers(buf, slots) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            if len > self.limits.max_head_bytes {
                                return Err(CodecError("trailer section too large"));
                            }
                            // httparse takes a bare LF for a line's end; the chunk lines
                            // before do not, and neither does the trailer section.
                            if bare_lf(&buf[..len]) {
                                return Err(CodecError("a trailer line not ended by CRLF"));
                            }
                            let trailers = header_map(fields)?;
                            let _ = buf.split_to(len);
                            self.state = State::Done;
                            return Ok(Decoded::Trailers(trailers));
                        }
                        Ok(httparse::Status::Partial) => {
                            let too_large = buf.len() >= self.limits.max_head_bytes;
                            return self.need_more(too_large, "trailer section too large", closed);
                        }
                        Err(httparse::Error::TooManyHeaders) => return Err(CodecError("too many trailer fields")),
                        Err(_) => return Err(CodecError("malformed trailer section")),
                    }
                }
                State::Length(_) | State::ChunkData(_) | State::UntilClose => return self.need_more(false, "", closed),
            }
        }
    }

    /// [`Decoded::NeedMore`], unless the buffer already holds too much (`too_large`: error
    /// `what`) or the peer has closed within the body.
    fn need_more(&self, too_large: bool, what: &'static str, closed: bool) -> Result<Decoded, CodecError> {
        if too_large {
            Err(CodecError(what))
        } else if closed {
            Err(CodecError("the connection closed within a body"))
        } else {
            Ok(Decoded::NeedMore)
        }
    }
}

/// Whether `lines` has an LF not preceded by CR.
fn bare_lf(lines: &[u8]) -> bool {
    lines.first() == Some(&b'\n') || lines.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r')
}

/// The size on a chunk-size line (ending in CRLF): hex digits, then nothing, or chunk
/// extensions after optional whitespace and `;`.
fn chunk_size(line: &[u8]) -> Result<u64, CodecError> {
    let line = line.strip_suffix(b"\r\n").ok_or(CodecError("chunk-size line not ended by CRLF"))?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(CodecError("invalid chunk size"));
    }
    let rest = &line[digits..];
    let extensions = rest.trim_ascii_start();
    if !rest.is_empty() && !extensions.starts_with(b";") {
        return Err(CodecError("invalid chunk size"));
    }
    if extensions.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(CodecError("control character in a chunk extension"));
    }
    let mut size = 0u64;
    for &d in &line[..digits] {
        let v = (d as char).to_digit(16).unwrap_or(0);
        size = size.checked_mul(16).ok_or(CodecError("chunk size too large"))? | u64::from(v);
    }
    Ok(size)
}

/// `n` in decimal, in `digits`.
fn itoa(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

#[cfg(test)]
mod tests;
