//! The proxy's own HTTP/1 codec (`plexus_proxy::http::h1_codec`): the request-head parser,
//! the response-head parser and the chunked body decoder never panic, and none of them
//! depends on how the bytes arrive — a head found in a buffer is found, the same, in every
//! longer buffer and in none shorter; a chunked body decodes to the same data, trailers, end
//! (or refusal) and leftover bytes whether it is fed whole or in two pieces cut anywhere.
#![no_main]

use bytes::BytesMut;
use http::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use plexus_proxy::http::h1_codec::{
    BodyDecoder, Decoded, FieldNames, Framing, Limits, parse_request_head, parse_response_head,
};

const LIMITS: Limits = Limits { max_head_bytes: 1024, max_headers: 16 };

/// What a request head parse says, comparably.
fn request(data: &[u8]) -> Option<Result<(String, String, usize, Framing, bool), String>> {
    match parse_request_head(data, &LIMITS, &mut HeaderMap::new(), &mut FieldNames::default()) {
        Ok(None) => None,
        Ok(Some(h)) => {
            assert!(h.len <= data.len() && h.len <= LIMITS.max_head_bytes, "head longer than its bytes");
            assert!(h.headers.len() <= LIMITS.max_headers);
            Some(Ok((h.method.to_string(), h.uri.to_string(), h.len, h.framing, h.keep_alive)))
        }
        Err(e) => Some(Err(format!("{e:?}"))),
    }
}

/// Decodes a chunked body from `wire`, fed as `wire[..cut]` then the rest: its data, its
/// trailers, whether it ended, and the bytes left after it (or the refusal).
fn chunked(wire: &[u8], cut: usize) -> Result<(Vec<u8>, Option<HeaderMap>, Vec<u8>), String> {
    let mut decoder = BodyDecoder::new(Framing::Chunked, LIMITS);
    let (mut buf, mut data, mut trailers) = (BytesMut::from(&wire[..cut]), Vec::new(), None);
    let mut fed = cut;
    loop {
        match decoder.decode(&mut buf, fed == wire.len()).map_err(|e| e.0.to_string())? {
            Decoded::Data(d) => {
                assert!(!d.is_empty(), "an empty data frame");
                data.extend_from_slice(&d);
            }
            Decoded::Trailers(t) => {
                assert!(!t.is_empty(), "an empty trailer section");
                assert!(trailers.replace(t).is_none(), "two trailer sections");
            }
            Decoded::End => {
                // What follows the body: the bytes left, then those not fed yet.
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&wire[fed..]);
                return Ok((data, trailers, rest));
            }
            Decoded::NeedMore => {
                assert!(fed < wire.len(), "more wanted after the end was announced");
                buf.extend_from_slice(&wire[fed..]);
                fed = wire.len();
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else { return };
    let cut = usize::from(seed) * data.len() / 255;

    // Request heads: a head found in a prefix is the head of every longer buffer.
    let whole = request(data);
    if let Some(Ok((_, _, len, _, _))) = &whole {
        assert_eq!(request(&data[..*len]), whole, "the head alone parses differently");
    }
    if let Some(Ok(found)) = request(&data[..cut]) {
        assert_eq!(whole, Some(Ok(found)), "a head in a prefix changed with more bytes");
    }

    // Response heads, for a GET and a HEAD: never a panic; what is taken is the head only.
    for method in [Method::GET, Method::HEAD] {
        let mut buf = BytesMut::from(data);
        if let Ok(Some(_)) = parse_response_head(&mut buf, &method, &LIMITS, &mut HeaderMap::new(), &mut FieldNames::default()) {
            assert!(data.ends_with(&buf), "taken bytes are not the head's");
        }
    }

    // Chunked bodies: the same whole or in two pieces.
    let one = chunked(data, data.len());
    let two = chunked(data, cut);
    match (&one, &two) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "a body decodes differently cut at {cut}"),
        (Err(_), Err(_)) => {}
        _ => panic!("cut at {cut}: {one:?} vs {two:?}"),
    }
    if let Ok((body, _, rest)) = &one {
        assert!(body.len() + rest.len() <= data.len());
    }
});
