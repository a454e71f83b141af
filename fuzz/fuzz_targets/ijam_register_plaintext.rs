//! The registration plaintext decoder: never panics, and whatever it accepts re-encodes
//! to the same bytes and parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registrar::wire::ijam::RegisterRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = RegisterRequest::parse(data) {
        let bytes = request.to_bytes();
        assert_eq!(bytes.as_slice(), data);
        assert_eq!(RegisterRequest::parse(&bytes), Ok(request));
    }
});
