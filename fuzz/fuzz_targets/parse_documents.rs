//! The resource parser (`plexus_core::parse_documents`, YAML or JSON, then validation and
//! compilation into a snapshot): never panics, whatever the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(resources) = plexus_core::parse_documents("fuzz.yaml", text) {
        let _ = plexus_core::MeshSnapshot::compile(&resources, "fuzz".into());
    }
});
