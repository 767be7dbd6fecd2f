//! The path normalizer (`plexus_core::normalize`): never panics; what it accepts is normal
//! (normalizing again changes nothing) and free of the spellings it refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_core::normalize::{PathOptions, check_method, is_normal, normalize_path};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let _ = check_method(path);
    for allow_encoded_slashes in [false, true] {
        let options = PathOptions { allow_encoded_slashes };
        if let Ok(n) = normalize_path(path, options) {
            assert_eq!(normalize_path(&n, options).as_deref(), Ok(&*n), "not idempotent: {path:?}");
            assert!(!n.contains('\\') && !n.contains("%25") && !n.contains("%5C"), "{path:?} → {n:?}");
            assert!(allow_encoded_slashes || !n.contains("%2F"), "{path:?} → {n:?}");
            assert!(n == "*" || n.starts_with('/'), "{path:?} → {n:?}");
            assert!(!n.split('/').any(|s| s == "." || s == ".."), "{path:?} → {n:?}");
        }
        if is_normal(path) {
            assert_eq!(normalize_path(path, options).as_deref(), Ok(path));
        }
    }
});
