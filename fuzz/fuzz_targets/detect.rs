//! Protocol detection (`plexus_proxy::transport::detect::classify`): never panics, and a
//! decision never changes as more bytes arrive (what was HTTP stays HTTP).
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proxy::transport::detect::classify;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    // Every prefix that decided must have decided the same way, except for TLS, whose
    // ClientHello details (SNI, ALPN) are read from what has arrived.
    for end in 0..data.len() {
        if let Some(p) = classify(&data[..end])
            && !matches!(p, plexus_proxy::transport::detect::Protocol::Tls { .. })
        {
            assert_eq!(Some(&p), whole.as_ref(), "{:?} then {:?}", &data[..end], data);
        }
    }
});
