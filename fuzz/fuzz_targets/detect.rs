//! Protocol detection (`plexus_proxy::transport::detect::classify`): never panics, and a
//! decision never changes as more bytes arrive (what was HTTP stays HTTP; a ClientHello's
//! SNI and ALPN are read from the same bytes however they arrived), so the same bytes give
//! the same class in every split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proxy::transport::detect::classify;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    // Every prefix that decided must have decided the same way.
    for end in 0..data.len() {
        if let Some(p) = classify(&data[..end]) {
            assert_eq!(Some(&p), whole.as_ref(), "{:?} then {:?}", &data[..end], data);
        }
    }
});
