//! Arbitrary UTF-8 as a config file: `check_config` (= `Config::from_toml`
//! with no flags) returns `Ok` or an error message, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = tokend::check_config(text) {
        assert!(!e.is_empty(), "an error without a message");
    }
});
