//! What a client parses: reply status split, the 200 reply body plaintext. Never
//! panics; an accepted body round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registrar::wire::ijam::{parse_register_reply_plaintext, parse_reply_status, register_reply_plaintext};

fuzz_target!(|data: &[u8]| {
    let _ = parse_reply_status(data);
    if let Ok(id) = parse_register_reply_plaintext(data) {
        assert_eq!(register_reply_plaintext(id).as_slice(), data);
    }
});
