//! The envelope frame: header, length bound, CRC-32C. Never panics; a frame accepted
//! as a datagram re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registrar::wire::envelope::{self, DEFAULT_MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let _ = envelope::missing(data, DEFAULT_MAX_PAYLOAD);
    let _ = envelope::check(data, DEFAULT_MAX_PAYLOAD);
    if let Ok((header, payload)) = envelope::parse_datagram(data, DEFAULT_MAX_PAYLOAD) {
        assert_eq!(envelope::to_vec(&header, payload), data);
    }
});
