//! The state request: the 48-byte frame layout and the decrypted block's padding,
//! checksum and status code. Never panics; an accepted block round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registrar::wire::ijam::{RawStateRequest, StateCode};
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let _ = RawStateRequest::ref_from_bytes(data);
    if let Ok(code) = StateCode::parse_plaintext(data) {
        assert_eq!(code.plaintext().as_slice(), data);
    }
});
