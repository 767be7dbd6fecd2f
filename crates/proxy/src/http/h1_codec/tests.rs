use super::*;
use proptest::prelude::*;

const LIMITS: Limits = Limits { max_head_bytes: 8192, max_headers: 100 };

fn head(text: &str) -> Result<Option<ResponseHead>, CodecError> {
    parse(text.as_bytes(), &Method::GET, &LIMITS).0
}

/// Parses `wire` as a response head into a map of its own: the result and what was left in
/// the buffer.
fn parse(wire: &[u8], method: &Method, limits: &Limits) -> (Result<Option<ResponseHead>, CodecError>, BytesMut) {
    let mut buf = BytesMut::from(wire);
    let got = parse_response_head(&mut buf, method, limits, &mut HeaderMap::new(), &mut FieldNames::default());
    (got, buf)
}

fn complete(text: &str) -> ResponseHead {
    match head(text) {
        Ok(Some(h)) => h,
        other => panic!("{text:?}: {other:?}"),
    }
}

fn refused(text: &str) -> &'static str {
    match head(text) {
        Err(CodecError(why)) => why,
        other => panic!("{text:?} was accepted: {other:?}"),
    }
}

/// A decoded body: its data, its trailers, and what was left in the buffer after its end.
type Whole = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

/// Decodes a whole body from `wire` fed in pieces of `pieces` bytes: its data, its trailers,
/// and what was left in the buffer after its end.
fn decode_all(framing: Framing, wire: &[u8], pieces: usize) -> Result<Whole, CodecError> {
    let mut decoder = BodyDecoder::new(framing, LIMITS);
    let (mut buf, mut data, mut trailers) = (BytesMut::new(), Vec::new(), None);
    let mut fed = 0;
    loop {
        match decoder.decode(&mut buf, fed == wire.len())? {
            Decoded::Data(d) => data.extend_from_slice(&d),
            Decoded::Trailers(t) => trailers = Some(t),
            Decoded::End => return Ok((data, trailers, buf.to_vec())),
            Decoded::NeedMore => {
                let next = (fed + pieces.max(1)).min(wire.len());
                buf.extend_from_slice(&wire[fed..next]);
                fed = next;
            }
        }
    }
}

#[test]
fn a_request_head_carries_its_framing_from_the_framing_alone() {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("reviews:9080"));
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    // Framing fields in the map are never copied: the framing says what the body is.
    headers.insert("content-length", HeaderValue::from_static("5"));
    headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    let mut out = Vec::new();
    encode_request_head(&Method::POST, "/a?b=c", &headers, Framing::Length(12), &mut out);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "POST /a?b=c HTTP/1.1\r\nhost: reviews:9080\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12\r\n\r\n"
    );
    out.clear();
    encode_request_head(&Method::PUT, "/", &headers, Framing::Chunked, &mut out);
    assert!(out.ends_with(b"x-a: 2\r\ntransfer-encoding: chunked\r\n\r\n"), "{}", String::from_utf8_lossy(&out));
    out.clear();
    encode_request_head(&Method::GET, "", &HeaderMap::new(), Framing::Empty, &mut out);
    assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    out.clear();
    encode_request_head(&Method::POST, "/", &HeaderMap::new(), Framing::Length(0), &mut out);
    assert_eq!(out, b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
}

#[test]
fn chunks_are_written_in_hex_and_the_last_with_its_trailers() {
    for (len, want) in
        [(1, "1\r\n"), (10, "a\r\n"), (255, "ff\r\n"), (4096, "1000\r\n"), (usize::MAX, "ffffffffffffffff\r\n")]
    {
        let mut out = Vec::new();
        encode_chunk_header(len, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), want);
    }
    let mut out = Vec::new();
    encode_last_chunk(&HeaderMap::new(), &mut out);
    assert_eq!(out, b"0\r\n\r\n");
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    out.clear();
    encode_last_chunk(&trailers, &mut out);
    assert_eq!(out, b"0\r\ngrpc-status: 0\r\n\r\n");
    // What is written decodes back.
    let mut wire = Vec::new();
    encode_chunk_header(3, &mut wire);
    wire.extend_from_slice(b"abc\r\n");
    encode_last_chunk(&trailers, &mut wire);
    let (data, got, rest) = decode_all(Framing::Chunked, &wire, 1).expect("decodes");
    assert_eq!((data.as_slice(), got, rest.len()), (&b"abc"[..], Some(trailers), 0));
}

/// Fields that frame, route, authenticate or describe a message are not taken from a trailer
/// section (RFC 9110 §6.5.1; the list hyper's encoder kept, with the connection's own fields
/// and the identity the proxy vouches for): never written as trailers, whatever a peer sent.
#[test]
fn trailers_never_carry_framing_routing_or_identity_fields() {
    let mut trailers = HeaderMap::new();
    for name in [
        "content-length",
        "transfer-encoding",
        "host",
        "authorization",
        "content-type",
        "content-encoding",
        "trailer",
        "te",
        "connection",
        "upgrade",
        "x-forwarded-client-cert",
        "x-plexus-source",
        "grpc-status",
        "x-checksum",
    ] {
        trailers.append(HeaderName::from_static(name), HeaderValue::from_static("1"));
    }
    let mut out = Vec::new();
    encode_last_chunk(&trailers, &mut out);
    // Positive control: the other fields are written, in order.
    assert_eq!(String::from_utf8_lossy(&out), "0\r\ngrpc-status: 1\r\nx-checksum: 1\r\n\r\n");
}

#[test]
fn a_response_head_is_read_once_whole() {
    let text =
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nX-Twice: a\r\nX-Twice: b\r\n\r\nok\n";
    for cut in 0..text.len() - 3 {
        assert!(head(&text[..cut]).expect("a prefix is not an error").is_none(), "complete at {cut}");
    }
    let h = complete(text);
    assert_eq!(
        (h.status, h.version, h.framing, h.keep_alive),
        (StatusCode::OK, Version::HTTP_11, Framing::Length(3), true)
    );
    assert_eq!(&parse(text.as_bytes(), &Method::GET, &LIMITS).1[..], b"ok\n", "the body is not part of the head");
    assert_eq!(h.headers.get("content-type").map(HeaderValue::as_bytes), Some(&b"text/plain"[..]));
    let twice: Vec<_> = h.headers.get_all("x-twice").iter().map(HeaderValue::as_bytes).collect();
    assert_eq!(twice, [&b"a"[..], b"b"]);
}

/// A final head's fields take the allocation of the map given (the request's), their values
/// the bytes read; a partial head, a refused one and a `1xx` leave that map as it was.
#[test]
fn a_final_head_reuses_the_map_given_and_others_leave_it() {
    let request = || {
        let mut m = HeaderMap::with_capacity(32);
        m.insert("host", HeaderValue::from_static("reviews:9080"));
        m
    };
    let untouched = |wire: &str| {
        let mut map = request();
        let mut buf = BytesMut::from(wire.as_bytes());
        let got = parse_response_head(&mut buf, &Method::GET, &LIMITS, &mut map, &mut FieldNames::default());
        assert!(!matches!(got, Ok(Some(ref h)) if !h.status.is_informational()), "{wire:?}: {got:?}");
        assert_eq!(map, request(), "{wire:?}");
    };
    untouched("HTTP/1.1 200 OK\r\nContent-Len");
    untouched("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
    untouched("HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n");
    untouched("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n");
    // Positive control: a final head takes the map, which is left empty.
    let mut map = request();
    let capacity = map.capacity();
    let mut buf =
        BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n"[..]);
    let interim = parse_response_head(&mut buf, &Method::GET, &LIMITS, &mut map, &mut FieldNames::default())
        .expect("parsed")
        .expect("whole");
    assert_eq!((interim.status, interim.headers.len()), (StatusCode::CONTINUE, 0));
    let h = parse_response_head(&mut buf, &Method::GET, &LIMITS, &mut map, &mut FieldNames::default())
        .expect("parsed")
        .expect("whole");
    assert!(map.is_empty() && buf.is_empty());
    assert_eq!(h.headers.get("x-a").map(HeaderValue::as_bytes), Some(&b"1"[..]));
    assert_eq!((h.headers.len(), h.headers.capacity()), (2, capacity), "the request's allocation, its fields gone");
}

#[test]
fn framing_follows_rfc_9112() {
    let framing = |t: &str| complete(t).framing;
    assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"), Framing::Length(10));
    assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), Framing::Empty);
    assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n"), Framing::Length(7));
    assert_eq!(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), Framing::Chunked);
    assert_eq!(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n"), Framing::Chunked);
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Framing::Chunked
    );
    // No body, whatever the fields say.
    for t in [
        "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n",
        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
    ] {
        assert_eq!(framing(t), Framing::Empty, "{t:?}");
    }
    let to_head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", &Method::HEAD, &LIMITS).0;
    assert_eq!(to_head.ok().flatten().map(|h| (h.framing, h.keep_alive)), Some((Framing::Empty, true)));
    // Until the connection closes: never kept alive.
    for t in ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"] {
        let h = complete(t);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false), "{t:?}");
    }
}

#[test]
fn keep_alive_follows_the_version_and_connection_options() {
    let alive = |t: &str| complete(t).keep_alive;
    assert!(alive("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
    assert!(!alive("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"));
    assert!(!alive("HTTP/1.1 200 OK\r\nConnection: x-a, Close\r\nContent-Length: 0\r\n\r\n"));
    assert!(!alive("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
    assert!(alive("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"));
    assert!(!alive("HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n"));
}

#[test]
fn ambiguous_or_malformed_heads_are_refused() {
    for (text, why) in [
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "both"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "differing"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", "differing"),
        ("HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n", "invalid Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "invalid Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n", "invalid Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", "invalid Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 3,\r\n\r\n", "invalid Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", "invalid Content-Length"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "not the last"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "not the last"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n", "empty Transfer-Encoding"),
        ("HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n", "malformed"),
        ("HTTP/1.1 200 OK\r\nX-Bad\x01: a\r\n\r\n", "malformed"),
        ("HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\n\r\n", "malformed"),
        ("HTTP/1.1 2000 OK\r\n\r\n", "malformed"),
        ("HTTP/2.0 200 OK\r\n\r\n", "malformed"),
        ("ICY 200 OK\r\n\r\n", "malformed"),
    ] {
        let got = refused(text);
        assert!(got.contains(why), "{text:?}: {got:?} does not say {why:?}");
    }
}

/// An HTTP/1.0 response has no transfer coding (RFC 9112 §6.1: its framing is faulty, even
/// with a `Content-Length`), as hyper's client had it: refused, not read as chunked on a
/// connection then kept.
#[test]
fn an_http10_response_with_a_transfer_coding_is_refused() {
    for text in [
        "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
        "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        "HTTP/1.0 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert!(refused(text).contains("HTTP/1.0"), "{text:?}");
    }
    // Positive controls: HTTP/1.0 with a length or to its close, HTTP/1.1 chunked.
    let kept = complete("HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!((kept.framing, kept.keep_alive), (Framing::Length(5), true));
    assert_eq!(complete("HTTP/1.0 200 OK\r\n\r\n").framing, Framing::UntilClose);
    assert_eq!(complete("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing, Framing::Chunked);
}

#[test]
fn heads_are_bounded_in_size_and_fields() {
    let small = Limits { max_head_bytes: 64, max_headers: 3 };
    let parse = |t: &str| parse(t.as_bytes(), &Method::GET, &small).0;
    // Positive control: within both limits.
    assert!(matches!(parse("HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"), Ok(Some(_))));
    assert_eq!(
        parse("HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n").err(),
        Some(CodecError("too many header fields in a response head"))
    );
    let long = format!("HTTP/1.1 200 OK\r\nA: {}\r\n\r\n", "x".repeat(64));
    assert_eq!(parse(&long).err(), Some(CodecError("response head too large")));
    // Never complete, and already at the limit: refused rather than read on.
    assert_eq!(parse(&long[..70]).err(), Some(CodecError("response head too large")));
    assert!(matches!(parse(&long[..40]), Ok(None)));
}

#[test]
fn a_length_body_ends_at_its_length_and_leaves_what_follows() {
    let wire = b"hello worldHTTP/1.1 200 OK\r\n";
    for pieces in [1, 3, 100] {
        let (data, trailers, rest) = decode_all(Framing::Length(11), wire, pieces).expect("decodes");
        assert_eq!((data.as_slice(), trailers), (&b"hello world"[..], None));
        // Fed piecewise the decoder never reads ahead; fed at once the rest stays in the buffer.
        assert!(wire[11..].starts_with(&rest), "{pieces}: {rest:?}");
    }
    assert_eq!(
        decode_all(Framing::Length(12), b"hello world", 4).err(),
        Some(CodecError("the connection closed within a body"))
    );
    assert_eq!(decode_all(Framing::Empty, b"", 1).map(|d| d.0.len()), Ok(0));
    let (data, _, _) = decode_all(Framing::UntilClose, b"all of it", 2).expect("until close");
    assert_eq!(data, b"all of it");
}

#[test]
fn chunked_bodies_decode_with_extensions_and_trailers() {
    let wire = b"5\r\nhello\r\n6;name=value; x=\"q\"\r\n world\r\nA\r\n0123456789\r\n0\r\nGrpc-Status: 0\r\nX-T: t\r\n\r\nNEXT";
    for pieces in [1, 2, 7, wire.len()] {
        let (data, trailers, rest) = decode_all(Framing::Chunked, wire, pieces).expect("decodes");
        assert_eq!(data, b"hello world0123456789");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(HeaderValue::as_bytes), Some(&b"0"[..]));
        assert_eq!(trailers.len(), 2);
        assert!(b"NEXT".starts_with(&rest), "{pieces}: {rest:?}");
    }
    let (data, trailers, rest) = decode_all(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\nNEXT", 100).expect("decodes");
    assert_eq!((data.as_slice(), trailers, rest.as_slice()), (&b"abc"[..], None, &b"NEXT"[..]));
    // Upper-case hex, leading zeros.
    let (data, _, _) = decode_all(Framing::Chunked, b"0000B\r\nhello world\r\n0\r\n\r\n", 3).expect("decodes");
    assert_eq!(data, b"hello world");
}

#[test]
fn malformed_chunking_is_refused() {
    for (wire, why) in [
        (&b"0x5\r\nhello\r\n0\r\n\r\n"[..], "invalid chunk size"),
        (b"g\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b" 5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"-5\r\n", "invalid chunk size"),
        (b"5 x\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"5\nhello\r\n0\r\n\r\n", "not ended by CRLF"),
        (b"5\rhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"5\r\nhelloXY0\r\n\r\n", "not followed by CRLF"),
        (b"5\r\nhello\n0\r\n\r\n", "not followed by CRLF"),
        (b"5\r\nhello world\r\n0\r\n\r\n", "not followed by CRLF"),
        (b"10000000000000000\r\n", "invalid chunk size"),
        (b"5;a\x01b\r\nhello\r\n0\r\n\r\n", "control character"),
        (b"3\r\nabc\r\n0\r\nX-Folded: a\r\n b\r\n\r\n", "malformed trailer"),
        (b"3\r\nabc\r\n0\r\nBad Name: a\r\n\r\n", "malformed trailer"),
        (b"3\r\nabc\r\n0\r\n", "closed within a body"),
        (b"3\r\nab", "closed within a body"),
        (b"3\r\nabc\r\n", "closed within a body"),
    ] {
        for pieces in [1, wire.len()] {
            match decode_all(Framing::Chunked, wire, pieces) {
                Err(CodecError(got)) => assert!(got.contains(why), "{wire:?} in {pieces}: {got:?}, not {why:?}"),
                Ok(decoded) => panic!("{:?} was accepted: {decoded:?}", String::from_utf8_lossy(wire)),
            }
        }
    }
    // The largest size that fits is read as a size (and then the body is short).
    assert_eq!(
        decode_all(Framing::Chunked, b"ffffffffffffffff\r\nab", 100).err(),
        Some(CodecError("the connection closed within a body"))
    );
}

#[test]
fn a_trailer_section_ends_its_lines_with_crlf_only() {
    // A bare LF ends nothing the chunk lines would not: a hop that reads `0\r\n\n` as an
    // unfinished trailer section reads the next request as trailers (and the other way round).
    for wire in [
        &b"3\r\nabc\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"3\r\nabc\r\n0\r\nX-T: a\n\r\n",
        b"3\r\nabc\r\n0\r\nX-T: a\r\n\n",
        b"3\r\nabc\r\n0\r\nX-T: a\n\n",
        b"3\r\nabc\r\n0\r\nX-T: a\r\nX-U: b\n\r\n",
    ] {
        for pieces in [1, 4, wire.len()] {
            match decode_all(Framing::Chunked, wire, pieces) {
                Err(CodecError(got)) => assert!(got.contains("trailer"), "{wire:?} in {pieces}: {got:?}"),
                Ok(decoded) => panic!("{:?} in {pieces} was accepted: {decoded:?}", String::from_utf8_lossy(wire)),
            }
        }
    }
    // The same sections with CRLF (positive control).
    for (wire, fields) in [
        (&b"3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\n"[..], 0),
        (b"3\r\nabc\r\n0\r\nX-T: a\r\n\r\n", 1),
        (b"3\r\nabc\r\n0\r\nX-T: a\r\nX-U: b\r\n\r\n", 2),
    ] {
        for pieces in [1, 4, wire.len()] {
            let (data, trailers, _) = decode_all(Framing::Chunked, wire, pieces).expect("decodes");
            assert_eq!((data.as_slice(), trailers.map_or(0, |t| t.len())), (&b"abc"[..], fields), "{wire:?}");
        }
    }
}

#[test]
fn chunk_lines_and_trailers_are_bounded() {
    let long_extension = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
    assert_eq!(
        decode_all(Framing::Chunked, long_extension.as_bytes(), 1000).err(),
        Some(CodecError("chunk-size line too long"))
    );
    let fine_extension = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(100));
    assert!(decode_all(Framing::Chunked, fine_extension.as_bytes(), 1000).is_ok());
    let big_trailer = format!("0\r\nX-Big: {}\r\n\r\n", "x".repeat(LIMITS.max_head_bytes));
    assert_eq!(
        decode_all(Framing::Chunked, big_trailer.as_bytes(), 100_000).err(),
        Some(CodecError("trailer section too large"))
    );
    assert_eq!(
        decode_all(Framing::Chunked, big_trailer.as_bytes(), 100).err(),
        Some(CodecError("trailer section too large"))
    );
    let many: String = (0..=LIMITS.max_headers).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("0\r\n{many}\r\n");
    assert_eq!(
        decode_all(Framing::Chunked, many.as_bytes(), 100_000).err(),
        Some(CodecError("too many trailer fields"))
    );
}

proptest! {
    /// Any body, cut into any chunks and fed in any piece size, decodes to itself and leaves
    /// the next message untouched.
    #[test]
    fn chunked_round_trip(body in proptest::collection::vec(any::<u8>(), 0..600), cuts in proptest::collection::vec(1usize..200, 0..8), pieces in 1usize..64) {
        let mut wire = Vec::new();
        let mut at = 0usize;
        for cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
            let end = at.saturating_add(*cut).min(body.len());
            if end > at {
                encode_chunk_header(end - at, &mut wire);
                wire.extend_from_slice(&body[at..end]);
                wire.extend_from_slice(b"\r\n");
            }
            at = end;
        }
        encode_last_chunk(&HeaderMap::new(), &mut wire);
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let (data, trailers, rest) = decode_all(Framing::Chunked, &wire, pieces).expect("decodes");
        prop_assert_eq!(data, body);
        prop_assert!(trailers.is_none());
        prop_assert!(b"HTTP/1.1 200 OK\r\n".starts_with(&rest));
    }

    /// Arbitrary bytes as a chunked body or a response head: an answer or an error, never a
    /// panic, and never more data than was fed.
    #[test]
    fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(any::<u8>(), 0..300), pieces in 1usize..32) {
        if let Ok((data, _, _)) = decode_all(Framing::Chunked, &wire, pieces) {
            prop_assert!(data.len() <= wire.len());
        }
        let _ = parse(&wire, &Method::GET, &LIMITS);
        let _ = parse_request_head(&wire, &LIMITS, &mut HeaderMap::new(), &mut FieldNames::default());
    }

    /// A well-formed request head with arbitrary field values (any byte a value may hold)
    /// parses back to its target and values, whatever precedes it in the buffer's allocation.
    #[test]
    fn request_heads_parse_back(values in proptest::collection::vec(proptest::collection::vec(0x20u8..0x7f, 0..40), 0..10), path in "/[a-z0-9/]{0,30}") {
        let mut wire = format!("GET {path} HTTP/1.1\r\nHost: a\r\n").into_bytes();
        for (i, v) in values.iter().enumerate() {
            wire.extend_from_slice(format!("x-f{i}: ").as_bytes());
            wire.extend_from_slice(v);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"\r\nrest");
        let head = parse_request_head(&wire, &LIMITS, &mut HeaderMap::new(), &mut FieldNames::default()).expect("valid").expect("whole");
        prop_assert_eq!(head.uri.path(), path.as_str());
        prop_assert_eq!(head.len, wire.len() - 4);
        for (i, v) in values.iter().enumerate() {
            let got = head.headers.get(format!("x-f{i}")).expect("field");
            prop_assert_eq!(got.as_bytes(), v.trim_ascii());
        }
    }
}

/// A request head as the proxy's server reads it.
fn request(text: &str) -> Result<Option<RequestHead>, HeadError> {
    parse_request_head(text.as_bytes(), &LIMITS, &mut HeaderMap::new(), &mut FieldNames::default())
}

#[test]
fn a_request_head_is_read_with_its_framing_and_connection_options() {
    let head =
        request("POST /up?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello").expect("valid").expect("whole");
    assert_eq!(
        (head.method, head.uri.to_string(), head.version),
        (Method::POST, "/up?x=1".to_string(), Version::HTTP_11)
    );
    assert_eq!((head.framing, head.keep_alive, head.expect_continue), (Framing::Length(5), true, false));
    assert_eq!(head.len, "POST /up?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n".len());
    assert!(request("GET / HTTP/1.1\r\nHost: a\r\n").expect("valid").is_none(), "partial");
    let chunked = request("PUT / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n");
    let chunked = chunked.expect("valid").expect("whole");
    assert_eq!((chunked.framing, chunked.expect_continue), (Framing::Chunked, true));
    let old = request("GET http://a/b HTTP/1.0\r\n\r\n").expect("valid").expect("whole");
    assert_eq!((old.uri.host(), old.keep_alive, old.framing), (Some("a"), false, Framing::Empty));
    let kept = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").expect("valid").expect("whole");
    assert!(kept.keep_alive);
    let closed = request("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").expect("valid").expect("whole");
    assert!(!closed.keep_alive);
    // A field repeated: every occurrence counts, not only the first.
    let again = request("GET / HTTP/1.1\r\nConnection: foo\r\nX-A: 1\r\nConnection: close\r\n\r\n");
    assert!(!again.expect("valid").expect("whole").keep_alive);
    let expect = request("PUT / HTTP/1.1\r\nExpect: x\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n");
    assert!(expect.expect("valid").expect("whole").expect_continue);
    // Empty lines before the request line are skipped (RFC 9112 §2.2).
    assert!(request("\r\nGET / HTTP/1.1\r\n\r\n").expect("valid").is_some());
}

#[test]
fn ambiguous_or_malformed_request_heads_are_refused() {
    for text in [
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n",
        "GET / HTTP/2.0\r\n\r\n",
        "GET /a b HTTP/1.1\r\n\r\n",
        "G\x01T / HTTP/1.1\r\n\r\n",
    ] {
        assert!(matches!(request(text), Err(HeadError::Malformed(_))), "{text:?}: {:?}", request(text));
    }
    // Positive controls: the same lengths said the same way twice, a list of one value.
    for text in [
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
    ] {
        assert_eq!(request(text).expect("valid").expect("whole").framing, Framing::Length(5), "{text:?}");
    }
}

#[test]
fn request_heads_are_bounded_in_size_and_fields() {
    let limits = Limits { max_head_bytes: 64, max_headers: 3 };
    let long = format!("GET / HTTP/1.1\r\nX-A: {}\r\n\r\n", "a".repeat(60));
    assert_eq!(
        parse_request_head(long.as_bytes(), &limits, &mut HeaderMap::new(), &mut FieldNames::default()).err(),
        Some(HeadError::TooLarge)
    );
    let unfinished = format!("GET / HTTP/1.1\r\nX-A: {}", "a".repeat(60));
    assert_eq!(
        parse_request_head(unfinished.as_bytes(), &limits, &mut HeaderMap::new(), &mut FieldNames::default()).err(),
        Some(HeadError::TooLarge)
    );
    let many = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
    assert_eq!(
        parse_request_head(many.as_bytes(), &limits, &mut HeaderMap::new(), &mut FieldNames::default()).err(),
        Some(HeadError::TooLarge)
    );
    let three = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
    assert!(
        parse_request_head(three.as_bytes(), &limits, &mut HeaderMap::new(), &mut FieldNames::default())
            .expect("valid")
            .is_some()
    );
}

#[test]
fn a_response_head_is_written_with_the_framing_it_is_sent_with() {
    let mut headers = HeaderMap::new();
    headers.insert("content-length", HeaderValue::from_static("99"));
    headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    headers.insert("x-a", HeaderValue::from_static("b"));
    let write = |status: u16, framing, connection, headers: &HeaderMap| {
        let mut out = Vec::new();
        let status = StatusCode::from_u16(status).expect("status");
        encode_response_head(Version::HTTP_11, status, headers, framing, connection, b"D", &mut out);
        String::from_utf8(out).expect("text")
    };
    assert_eq!(
        write(200, Framing::Length(3), None, &headers),
        "HTTP/1.1 200 OK\r\nx-a: b\r\ncontent-length: 3\r\ndate: D\r\n\r\n"
    );
    assert_eq!(
        write(200, Framing::Chunked, Some("close"), &headers),
        "HTTP/1.1 200 OK\r\nx-a: b\r\ntransfer-encoding: chunked\r\nconnection: close\r\ndate: D\r\n\r\n"
    );
    // No body sent (HEAD, 304): the length it declares is kept; 204 declares none.
    assert_eq!(
        write(304, Framing::Empty, None, &headers),
        "HTTP/1.1 304 Not Modified\r\ncontent-length: 99\r\nx-a: b\r\ndate: D\r\n\r\n"
    );
    assert_eq!(write(204, Framing::Empty, None, &headers), "HTTP/1.1 204 No Content\r\nx-a: b\r\ndate: D\r\n\r\n");
    let mut dated = HeaderMap::new();
    dated.insert("date", HeaderValue::from_static("then"));
    assert_eq!(
        write(599, Framing::Length(0), None, &dated),
        "HTTP/1.1 599 \r\ndate: then\r\ncontent-length: 0\r\n\r\n"
    );
}

#[test]
fn header_names_compare_ignoring_case_and_nothing_else() {
    for (name, lower, same) in [
        ("Content-Length", "content-length", true),
        ("CONTENT-LENGTH", "content-length", true),
        ("content-lengtH", "content-length", true),
        ("Transfer-Encoding", "transfer-encoding", true),
        ("transfer-encodinG", "transfer-encoding", true),
        ("content_length", "content-length", false),
        ("content-lengths", "content-length", false),
        ("xontent-length", "content-length", false),
        ("transfer-encodinf", "transfer-encoding", false),
        ("Expect", "expect", true),
        ("exPecT", "expect", true),
        ("accept", "expect", false),
        ("", "", true),
    ] {
        assert_eq!(is_name(name.as_bytes(), lower.as_bytes()), same, "{name} vs {lower}");
    }
    // Every token character against every letter and `-`: equal only to itself and its case.
    let tokens = (0x21u8..0x7f).filter(|c| !b"\"(),/:;<=>?@[\\]{}".contains(c));
    for c in tokens {
        for l in (b'a'..=b'z').chain([b'-']) {
            assert_eq!(is_name(&[c], &[l]), c.to_ascii_lowercase() == l, "{:?} vs {:?}", c as char, l as char);
        }
    }
}

#[test]
fn a_request_target_in_a_form_its_method_does_not_take_is_refused() {
    // Authority-form is CONNECT's alone (RFC 9112 §3.2.3): on another method it would name a
    // host apart from `Host`, and the proxy routes by the target's authority first. An
    // authority with userinfo is not an `http` URI's (RFC 9110 §4.2.4).
    for text in [
        "GET example.com:80 HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET example.com HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST reviews:9080 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        "OPTIONS example.com:80 HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http://a@b/ HTTP/1.1\r\nHost: b\r\n\r\n",
        "GET http://user:pw@b:80/x HTTP/1.1\r\nHost: b\r\n\r\n",
        "CONNECT user@b:443 HTTP/1.1\r\nHost: b:443\r\n\r\n",
    ] {
        assert!(matches!(request(text), Err(HeadError::Malformed(_))), "{text:?}: {:?}", request(text));
    }
    // Positive controls: each form with the method that takes it.
    for (text, authority) in [
        ("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", Some("example.com:443")),
        ("GET http://b:80/x HTTP/1.1\r\nHost: b\r\n\r\n", Some("b:80")),
        ("GET /x HTTP/1.1\r\nHost: b\r\n\r\n", None),
        ("GET //b/x HTTP/1.1\r\nHost: b\r\n\r\n", None),
        ("OPTIONS * HTTP/1.1\r\nHost: b\r\n\r\n", None),
    ] {
        let head = request(text).expect("valid").expect("whole");
        assert_eq!(head.uri.authority().map(|a| a.as_str()), authority, "{text:?}");
    }
}

#[test]
fn a_request_transfer_coding_other_than_chunked_is_refused() {
    // The proxy decodes chunked only and forwards the body re-framed as chunked alone: another
    // coding under it would reach the app undeclared (RFC 9112 §6.1: not understood, refused).
    for text in [
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x, Chunked\r\n\r\n",
    ] {
        assert!(matches!(request(text), Err(HeadError::Malformed(_))), "{text:?}: {:?}", request(text));
    }
    // Positive controls: chunked alone, however spelled and listed.
    for text in [
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked \r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked,\r\n\r\n",
    ] {
        assert_eq!(request(text).expect("valid").expect("whole").framing, Framing::Chunked, "{text:?}");
    }
}

/// Every byte in a field value, in a request head and in a response head: the head parses only
/// when `http` admits the byte in a value (what `field_value` relies on to skip its check),
/// and the value is then exactly the bytes sent.
#[test]
fn a_field_value_httparse_reads_is_one_http_admits() {
    for b in 0..=255u8 {
        if b == b'\r' || b == b'\n' {
            continue; // they end the line: not a byte of the value
        }
        let value = [b'a', b, b'z'];
        let admitted = HeaderValue::from_bytes(&value).is_ok();
        let mut request = b"GET / HTTP/1.1\r\nHost: a\r\nx-v: ".to_vec();
        request.extend_from_slice(&value);
        request.extend_from_slice(b"\r\n\r\n");
        match parse_request_head(&request, &LIMITS, &mut HeaderMap::new(), &mut FieldNames::default()) {
            Ok(Some(head)) => {
                assert!(admitted, "byte {b:#04x}: a request parsed with a value http refuses");
                assert_eq!(head.headers["x-v"].as_bytes(), &value, "byte {b:#04x}");
            }
            _ => assert!(!admitted, "byte {b:#04x}: a request refused for a value http admits"),
        }
        let mut response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-v: ".to_vec();
        response.extend_from_slice(&value);
        response.extend_from_slice(b"\r\n\r\n");
        match parse(&response, &Method::GET, &LIMITS).0 {
            Ok(Some(head)) => {
                assert!(admitted, "byte {b:#04x}: a response parsed with a value http refuses");
                assert_eq!(head.headers["x-v"].as_bytes(), &value, "byte {b:#04x}");
            }
            _ => assert!(!admitted, "byte {b:#04x}: a response refused for a value http admits"),
        }
    }
}

proptest! {
    /// Heads read one after another on a connection: every name is the one parsing its bytes
    /// gives, whether it repeats the last head's at its place, differs in case, is new, long,
    /// past the names kept, or not a name at all.
    #[test]
    fn kept_names_are_the_names_parsed(heads in proptest::collection::vec(
        proptest::collection::vec(
            prop_oneof![
                Just("Content-Type".to_string()),
                Just("content-type".to_string()),
                Just("Host".to_string()),
                Just("x-custom".to_string()),
                Just("X-Custom".to_string()),
                Just("x-".repeat(25)),
                "[a-zA-Z-]{1,12}",
                Just("bad name".to_string()),
            ],
            0..20,
        ),
        1..6,
    )) {
        let mut names = FieldNames::default();
        for head in &heads {
            names.start();
            for (i, raw) in head.iter().enumerate() {
                let kept = names.name(i, raw.as_bytes()).ok();
                let parsed = HeaderName::from_bytes(raw.as_bytes()).ok();
                prop_assert_eq!(kept, parsed, "name {} of {:?}", i, head);
            }
        }
        prop_assert!(names.names.len() <= NAMES_KEPT && names.spelled.len() <= NAMES_KEPT * NAME_KEPT_BYTES);
    }
}

/// A response head repeated on a connection takes its names from the last one (the kept
/// names are those of the last head), and one that differs replaces them from where it differs.
#[test]
fn a_repeated_head_reuses_its_names() {
    let mut names = FieldNames::default();
    let mut parse = |text: &str| {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_response_head(&mut buf, &Method::GET, &LIMITS, &mut HeaderMap::new(), &mut names)
            .expect("valid")
            .expect("whole")
    };
    let first = parse("HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n");
    let again = parse("HTTP/1.1 200 OK\r\nServer: t\r\nContent-Length: 0\r\nX-A: 2\r\n\r\n");
    assert_eq!(first.headers.keys().collect::<Vec<_>>(), again.headers.keys().collect::<Vec<_>>());
    assert_eq!(again.headers["x-a"], "2");
    let other = parse("HTTP/1.1 200 OK\r\nServer: t\r\nX-B: 3\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(other.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["server", "x-b", "content-length"]);
    assert_eq!(names.names.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(), ["server", "x-b", "content-length"]);
    assert_eq!(names.spelled, b"ServerX-BContent-Length");
}

/// The names of a map's fields, in order, lower-cased as `http` keeps them.
fn field_names(map: &HeaderMap) -> Vec<&str> {
    map.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn connection_management_the_codec_acted_on_is_left_out_of_the_map() {
    // (head's fields, keeps alive, the names left in the map)
    let cases: [(&str, bool, &[&str]); 7] = [
        ("Connection: keep-alive\r\nX-A: 1\r\n", true, &["x-a"]),
        ("Connection: Close\r\nX-A: 1\r\n", false, &["x-a"]),
        ("X-A: 1\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nConnection: close\r\n", false, &["x-a"]),
        ("Keep-Alive: timeout=5\r\nConnection: keep-alive\r\n", true, &[]),
        // Options that are not connection management stay, for the forward to act on (it
        // removes the fields they name, or carries out the upgrade).
        ("Connection: x-hop, close\r\nX-Hop: 1\r\n", false, &["connection", "x-hop"]),
        ("Connection: upgrade\r\nUpgrade: websocket\r\n", true, &["connection", "upgrade"]),
        // Names of the same length are not taken for it.
        ("Connectio: x\r\nX-Connect1: y\r\n", true, &["connectio", "x-connect1"]),
    ];
    let (mut spare, mut names) = (HeaderMap::new(), FieldNames::default());
    for (fields, keeps_alive, left) in cases {
        // Twice on one connection: the second head reads its names from the kept ones.
        for _ in 0..2 {
            let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            let head = parse_request_head(text.as_bytes(), &LIMITS, &mut spare, &mut names);
            let head = head.expect("valid").expect("whole");
            let mut want = vec!["host"];
            want.extend_from_slice(left);
            assert_eq!((head.keep_alive, field_names(&head.headers)), (keeps_alive, want), "request {fields:?}");
            spare = head.headers;
        }
        let mut reuse = HeaderMap::new();
        for _ in 0..2 {
            let mut buf = BytesMut::from(format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{fields}\r\n").as_bytes());
            let head = parse_response_head(&mut buf, &Method::GET, &LIMITS, &mut reuse, &mut names);
            let head = head.expect("valid").expect("whole");
            let mut want = vec!["content-length"];
            want.extend_from_slice(left);
            assert_eq!((head.keep_alive, field_names(&head.headers)), (keeps_alive, want), "response {fields:?}");
            reuse = head.headers;
        }
    }
}

/// A name that is no name, where the last head had another: the names kept after it are not
/// taken for the next ones (proptest found `[X-Custom, AaAaAa-a]` then `[bad name, X-Custom]`
/// reading the second `X-Custom` as `aaaaaa-a`, the bytes at its place having moved).
#[test]
fn a_name_that_is_no_name_drops_the_names_kept_after_it() {
    let mut names = FieldNames::default();
    names.start();
    for (i, raw) in ["X-Custom", "AaAaAa-a"].into_iter().enumerate() {
        names.name(i, raw.as_bytes()).expect("a name");
    }
    names.start();
    assert!(names.name(0, b"bad name").is_err());
    assert_eq!(names.name(1, b"X-Custom").expect("a name"), "x-custom");
}

/// Response heads of up to the field limit keep every field, in order, with its value: those
/// whose places fit on the stack (32) and longer ones.
#[test]
fn a_response_head_keeps_every_field_up_to_the_limit() {
    for count in [0, 1, 31, 32, 33, 64, LIMITS.max_headers - 1] {
        let fields: String = (0..count).map(|i| format!("X-{i}: value {i}\r\n")).collect();
        let text = format!("HTTP/1.1 200 OK\r\n{fields}Content-Length: 0\r\n\r\n");
        let head = complete(&text);
        let got: Vec<String> = head.headers.iter().map(|(n, v)| format!("{n}={}", v.to_str().unwrap_or("?"))).collect();
        let mut want: Vec<String> = (0..count).map(|i| format!("x-{i}=value {i}")).collect();
        want.push("content-length=0".to_string());
        assert_eq!(got, want, "{count} fields");
    }
}
